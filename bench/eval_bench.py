"""Episodes per second of each local evaluate.py backend (hf, vllm, oracle) on one model and split.

Each backend runs `evaluate.py` in its own process (as a user would), on the same instances,
with greedy decoding and the same token budget. The table gives the model load time and the
generation throughput (episodes / generation seconds, load excluded), the macro success, and
whether the hf and vllm responses are identical.

Usage
  python bench/eval_bench.py                                   # builds a tiny model and a small split
  python bench/eval_bench.py --size medium --max-new-tokens 128 --backends hf vllm
  python bench/eval_bench.py --model runs/opcd/best --data data/test --limit 64
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: build one with tiny.build_model)")
    p.add_argument("--size", default="tiny", choices=("tiny", "small", "medium"), help="size of the built model")
    p.add_argument("--data", default=None, help="split directory (default: make a test split)")
    p.add_argument("--per-level", type=int, default=2, help="instances per level of the made split")
    p.add_argument("--condition", default="both", choices=("image", "text", "both"), help="evaluate.py --condition")
    p.add_argument("--limit", type=int, default=None, help="evaluate.py --limit")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy budget per response")
    p.add_argument("--batch-size", type=int, default=32, help="hf batch size")
    p.add_argument("--backends", nargs="+", default=["oracle", "hf", "vllm"], choices=("oracle", "hf", "vllm"),
                   help="backends to time")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="eval_bench_") as work:
        bench(args, Path(work))


def bench(args, work):
    if args.model is None:
        from mgsd import tiny
        args.model = str(tiny.build_model(work / "model", size=args.size, seed=0, image_size=128))
    if args.data is None:
        from mgsd import splits
        args.data = str(splits.make_split(work / "data", "test", args.per_level, kinds=("planning",), image_size=128))

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TORCH_COMPILE_DISABLE="1")
    results = {}
    for backend in args.backends:
        out = work / backend
        cmd = [sys.executable, str(ROOT / "evaluate.py"), "--model", args.model, "--data", args.data,
               "--backend", backend, "--condition", args.condition, "--max-new-tokens", str(args.max_new_tokens),
               "--batch-size", str(args.batch_size), "--out", str(out)]
        cmd += ["--limit", str(args.limit)] if args.limit else []
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: {backend} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
        summary = json.loads((out / "summary.json").read_text())
        responses = [json.loads(line)["response"] for line in (out / "episodes.jsonl").read_text().splitlines()]
        results[backend] = (summary, responses)

    print(f"model {args.model}\ndata {args.data}, condition {args.condition}, max_new_tokens {args.max_new_tokens}\n")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.model)  # response lengths, re-tokenized (approximate)
    print("| backend | episodes | load s | generate s | episodes/s | response tokens/s | macro success (first condition) |")
    print("|---|---|---|---|---|---|---|")
    for backend, (summary, responses) in results.items():
        c = summary["config"]
        first = next(iter(summary["conditions"].values()))
        seconds = max(c["generate_seconds"], 1e-9)
        tokens = sum(len(tokenizer(r)["input_ids"]) for r in responses if r)
        print(f"| {backend} | {c['episodes']} | {c['load_seconds']:.1f} | {c['generate_seconds']:.2f} | "
              f"{c['episodes'] / seconds:.1f} | {tokens / seconds:.0f} | {100 * first['macro']['success']:.1f} |")
    if "hf" in results and "vllm" in results:
        same = sum(a == b for a, b in zip(results["hf"][1], results["vllm"][1]))
        print(f"\nhf and vllm identical responses: {same}/{len(results['hf'][1])}")


if __name__ == "__main__":
    main()
