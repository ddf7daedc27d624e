"""OPCD step throughput: --rollout hf (batched generate) against --rollout vllm (in-process
engine), and the in-process teacher against a served one (`served`: HF rollouts, the teacher behind a
`vllm serve` of the same model that this bench starts on 127.0.0.1, --teacher-url), same model, same
batch, same step code (opcd.opcd_step), printed side by side.

Per backend: one short warm-up rollout, then --steps full OPCD steps (rollout, teacher
forward, loss + backward + AdamW step, and for vLLM the weight push). Reports seconds per
phase, rollout tokens/s and samples/s. HF runs first: the vLLM engine binds the CPU threads of
the process when it starts.

If TRL is importable (requirements-bench.txt), its GKDTrainer (lmbda=1: on-policy, beta=1:
reverse KL) runs one warm-up and one measured step on the same model and batch size, as a
peer ratio. GKD takes text chats only, so its prompts lack the image (16 tokens shorter).

    OMP_NUM_THREADS=1 python bench/opcd_bench.py      # builds a "medium" (>= 30M) tiny model
    OMP_NUM_THREADS=1 python bench/opcd_bench.py --model models/medium --batch-size 32 --max-new-tokens 128

On a CPU shared with other jobs use OMP_NUM_THREADS=1: with 2 OpenMP threads on 2 busy cores,
every small decode-step matmul waits for a descheduled partner thread and HF generate slows
down ~6x (measured here: 12 new tokens for 8 prompts took 21 s with 2 threads, 3.3 s with 1).

Measured here (2-core CPU shared with other jobs, OMP_NUM_THREADS=1, 36.1M-parameter medium
model, batch 32, 128 new tokens, fp32), two runs: rollout hf 61.7 / 59.5 s (66 / 69 tok/s) vs
vllm 10.1 / 11.7 s (383 / 331 tok/s): 6.1x / 5.1x; teacher 18.3 / 20.3 vs 16.9 / 18.5 s and
train 40.6 / 44.9 vs 41.4 / 44.1 s (same code); whole step 0.27 / 0.26 vs 0.47 / 0.43 samples/s
(1.76x / 1.68x). TRL 1.16 GKDTrainer (installed apart, PYTHONPATH): on the medium model its
first step (warm-up included) took 1240 s, against ~125 s (hf) and ~74 s (vllm) for ours, so the
measured second step was not reached in the time available; on the 0.7M tiny model (batch 8, 16
new tokens) its second step took 3.0 s vs 0.67 s (hf) and 0.73 s (vllm) for ours (4.4x, 4.1x).
GKD feeds the same prompt to student and teacher (no privileged teacher context), so with a
copy of the student as teacher its loss is exactly 0.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import envs  # noqa: E402
import opcd  # noqa: E402
from mgsd import chat_api, common, optim, splits, tiny  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model folder (default: build a 'medium' tiny model in a temp dir)")
    p.add_argument("--size", default="medium", choices=["tiny", "small", "medium"], help="size to build without --model")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per step")
    p.add_argument("--micro-batch-size", type=int, default=4, help="sequences per forward/backward pass")
    p.add_argument("--max-new-tokens", type=int, default=128, help="response length cap (random models rarely stop)")
    p.add_argument("--steps", type=int, default=1, help="measured OPCD steps per backend")
    p.add_argument("--backends", default="hf,vllm,served", help="comma-separated runs to compare: hf, vllm (rollout "
                   "backends, in-process teacher), served (hf rollouts, the teacher served by vllm serve)")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="opcd-bench-"))
    model_dir = args.model or str(tiny.build_model(tmp / "model", size=args.size, image_size=128))
    data = splits.make_split(tmp / "train", "train", per_level=-(-args.batch_size * (args.steps + 1) // 12),
                           kinds=("planning",), image_size=128)
    model, processor = common.load_model(model_dir)
    teacher, _ = common.load_model(model_dir)
    teacher.requires_grad_(False).eval()
    n_params = sum(p.numel() for p in model.parameters())
    rows = splits.load_split(data, kinds=["planning"])
    print(f"model {model_dir}: {n_params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, max {args.max_new_tokens} new tokens, {args.steps} measured step(s)")
    results = {}
    for backend in args.backends.split(","):
        served = common.start_server(model_dir, "teacher") if backend == "served" else None
        o = opcd.parse_args(["--model", model_dir, "--teacher", "teacher" if served else model_dir, "--data", str(data),
                             "--out", str(tmp / "run"), "--rollout", "hf" if served else backend, "--batch-size",
                             str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size), "--max-new-tokens",
                             str(args.max_new_tokens), "--max-model-len", "4096"]
                            + (["--teacher-url", served[1]] if served else []))
        opt = optim.MasterAdamW(model.parameters(), o.lr, tuple(o.betas), o.weight_decay)
        llm, scorer = None, chat_api.ServedTeacher(served[1], "teacher") if served else teacher
        if backend == "vllm":
            t = time.time()
            llm = common.make_llm(model_dir, max_model_len=4096, kv_cache_bytes=1 << 30)
            common.push_weights(llm, model)
            print(f"vllm engine start: {time.time() - t:.1f} s")
        warm = [envs.student_messages(r["state"], r["image"]) for r in rows[:args.batch_size]]
        common.sample_responses(o.rollout, model, llm, processor, warm, 8, 1.0, 1.0, list(range(len(warm))))
        logs = [opcd.opcd_step(o, step, opcd.batch_rows(rows, step, args.batch_size, 0, 0, 1), model, scorer, llm,
                               processor, opt, 1, torch.device("cpu")) for step in range(args.steps)]
        mean = {k: sum(log[k] for log in logs) / len(logs) for k in
                ("seconds_rollout", "seconds_teacher", "seconds_train", "samples_per_second", "response_tokens")}
        mean["rollout_tokens_per_second"] = mean["response_tokens"] * args.batch_size / mean["seconds_rollout"]
        results[backend] = mean
        if llm is not None:
            common.close_llm(llm)
        if served:
            served[0].terminate()
            served[0].wait(timeout=60)
    keys = ["seconds_rollout", "seconds_teacher", "seconds_train", "response_tokens", "rollout_tokens_per_second",
            "samples_per_second"]
    print(f"{'':28s}" + "".join(f"{b:>12s}" for b in results))
    for k in keys:
        print(f"{k:28s}" + "".join(f"{results[b][k]:12.2f}" for b in results))
    if {"hf", "vllm"} <= set(results):
        rollout = results["hf"]["seconds_rollout"] / results["vllm"]["seconds_rollout"]
        step = results["vllm"]["samples_per_second"] / results["hf"]["samples_per_second"]
        print(f"vllm / hf: rollout {rollout:.2f}x faster, whole step {step:.2f}x the samples/s (target: rollout >= 1.3x)")
    if {"hf", "served"} <= set(results):
        print(f"served / in-process teacher: {results['served']['seconds_teacher'] / results['hf']['seconds_teacher']:.2f}x "
              f"the seconds of the teacher phase (the server shares this machine's cores)")
    try:
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        print("TRL is not installed (pip install -r requirements-bench.txt): no GKDTrainer (beta=1) peer ratio")
        return
    seconds = gkd_step_seconds(GKDConfig, GKDTrainer, model_dir, rows, args, tmp)
    gkd = args.batch_size / seconds
    print(f"TRL GKDTrainer (lmbda=1 on-policy, beta=1 reverse KL, text-only prompts, HF generate): {seconds:.1f} s/step, "
          f"{gkd:.2f} samples/s; ours / GKD: " + ", ".join(f"{b} {r['samples_per_second'] / gkd:.2f}x"
                                                          for b, r in results.items()))


def gkd_step_seconds(GKDConfig, GKDTrainer, model_dir, rows, args, tmp):
    """One measured step (after one warm-up step) of TRL's GKD on the same model and batch size.
    GKD takes text chats only, so the student prompt goes in without its image (16 tokens fewer)."""
    from datasets import Dataset
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        seconds = []

        def on_step_begin(self, *a, **k):
            self.start = time.time()

        def on_step_end(self, *a, **k):
            self.seconds.append(time.time() - self.start)

    model, processor = common.load_model(model_dir)
    teacher, _ = common.load_model(model_dir)
    data = Dataset.from_list([{"messages": [{"role": "user", "content": envs.student_prompt(r["state"])},
                                            {"role": "assistant", "content": envs.reference_response(r["state"])}]}
                              for r in rows])
    config = GKDConfig(output_dir=str(tmp / "gkd"), per_device_train_batch_size=args.batch_size, max_steps=2, lmbda=1.0,
                       beta=1.0, temperature=1.0, max_new_tokens=args.max_new_tokens, learning_rate=1e-6,
                       gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                       max_length=4096, dataloader_num_workers=0)
    timer = Timer()
    GKDTrainer(model=model, teacher_model=teacher, args=config, train_dataset=data,
               processing_class=processor.tokenizer, callbacks=[timer]).train()
    return timer.seconds[-1]


if __name__ == "__main__":
    main()
