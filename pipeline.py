"""The main job: the whole MGSD pipeline, end to end, on a small VLM built offline.

It chains the project's own command lines — exactly what a user would type — and prints each
one before running it:

    data        python envs.py data ...            train / val / test splits (images 128 px)
    model       python common.py tiny ...          a random Qwen3-VL of --size, tokenizer trained offline
    base        python sft.py --full ...           text-planning pre-training: the base model learns to plan
                                                   from the symbolic text state (the "instruct model")
    psft        python sft.py ... + merge.py       stage 1: perception SFT (LoRA), merged
    mgsd        python opcd.py ...                 stage 2: OPCD, teacher = the base model, text only
    eval        python evaluate.py ...             after every stage, image and text conditions

and writes OUT/results.md (a table), OUT/results.json and OUT/results.png (a plot). With
--rows all it also runs the ablations of results/mini/REPORT.md: OPCD without perception SFT,
direct visual SFT on the reference responses, and perception SFT with dynamics QA then OPCD.

Every stage is skipped when its output already exists, so an interrupted run resumes where
it stopped (delete a stage's folder to redo it).

    python pipeline.py                 # the default (small model): 32 min on a shared 2-core CPU
    python pipeline.py --quick         # a smoke run of every stage (57 s on a 2-core CPU; CI runs it)
    python pipeline.py --rows all --seed 1 --out runs/mini-s1
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TASKS = ("frozenlake", "maze", "minibehaviour")

# Settings of the default run and of --quick. Every value can be overridden by a flag.
DEFAULT = dict(size="small", levels="frozenlake=3,4 maze=3 minibehaviour=5", train_per_level=300,
               val_per_level=8, test_per_level=30, text_epochs=2, text_lr=2e-3, perception_epochs=1,
               perception_lr=5e-3, opcd_steps=20, opcd_batch=16, opcd_lr=1e-5, max_new_tokens=160)
QUICK = dict(size="tiny", levels="frozenlake=3 maze=3 minibehaviour=5", train_per_level=16, val_per_level=2,
             test_per_level=3, text_epochs=1, text_lr=1e-3, perception_epochs=1, perception_lr=1e-3, opcd_steps=2,
             opcd_batch=4, opcd_lr=1e-5, max_new_tokens=48)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/mini", help="run folder (stages already there are skipped)")
    p.add_argument("--quick", action="store_true", help="tiny model and data: a smoke run of every stage")
    p.add_argument("--rows", default="mgsd", choices=("mgsd", "all"),
                   help="mgsd: base, +perception SFT, +OPCD; all: also the ablations of the report")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, SFT order and OPCD sampling")
    p.add_argument("--rollout", default="hf", choices=("hf", "vllm"), help="OPCD rollout backend")
    p.add_argument("--workers", type=int, default=2, help="processes writing the data")
    p.add_argument("--size", help=f"model size of common.py tiny (default {DEFAULT['size']}, quick {QUICK['size']})")
    p.add_argument("--levels", help=f"levels per task, as task=l1,l2 (default {DEFAULT['levels']!r})")
    explain = dict(train_per_level="train instances per (task, level)", val_per_level="val instances per (task, level)",
                   test_per_level="held-out test instances per (task, level)",
                   text_epochs="epochs of text-planning pre-training", perception_epochs="epochs of perception SFT",
                   opcd_steps="OPCD optimiser steps", opcd_batch="OPCD prompts per step",
                   max_new_tokens="response budget in rollouts and evaluation",
                   text_lr="lr of text-planning pre-training (full)", perception_lr="lr of perception SFT (LoRA)",
                   opcd_lr="OPCD lr (the reference's 1e-6 is for 4B models)")
    for key, text in explain.items():
        p.add_argument("--" + key.replace("_", "-"), type=float if key.endswith("lr") else int,
                       help=f"{text}; default {DEFAULT[key]} (quick {QUICK[key]})")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULT).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def run(cmd, done_marker):
    """Run one stage's command unless its output exists; the command is printed first."""
    done_marker = Path(done_marker)
    if done_marker.exists():
        print(f"[skip] {done_marker} exists")
        return
    print("$ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    start = time.time()
    result = subprocess.run([str(c) for c in cmd], cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"error: stage failed with exit code {result.returncode}: {' '.join(map(str, cmd))}")
    print(f"  ({time.time() - start:.0f} s)", flush=True)


def main():
    args = parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    os.environ.setdefault("OMP_NUM_THREADS", "2")  # the stages inherit it
    start = time.time()
    data, models = out / "data", out / "models"
    levels = args.levels.split()

    # Data: train rows for text planning, perception (and dynamics for the ablation); val/test planning.
    train_kinds = "planning,text-planning,perception" + (",dynamics" if args.rows == "all" else "")
    for split, n, kinds in (("train", args.train_per_level, train_kinds), ("val", args.val_per_level, "planning"),
                            ("test", args.test_per_level, "planning,perception")):
        run([py, "envs.py", "data", "--out", data / split, "--split", split, "--per-level", n, "--kinds", kinds,
             "--levels", *levels, "--image-size", 128, "--workers", args.workers], data / split / "data.jsonl")

    # A small random VLM, then text-planning pre-training: the stand-in for an instruct model.
    run([py, "common.py", "tiny", "--out", models / "init", "--size", args.size, "--seed", args.seed],
        models / "init" / "config.json")
    sft = [py, "sft.py", "--data", data / "train", "--seed", args.seed, "--batch-size", 16, "--micro-batch-size", 8,
           "--max-new-tokens", args.max_new_tokens]
    run(sft + ["--model", models / "init", "--kinds", "text-planning", "--full", "--lr", args.text_lr,
               "--epochs", args.text_epochs, "--out", out / "sft-text"], out / "sft-text" / "model" / "config.json")
    base = out / "sft-text" / "model"

    def perception_sft(name, kinds):
        run(sft + ["--model", base, "--kinds", kinds, "--lr", args.perception_lr, "--epochs", args.perception_epochs,
                   "--out", out / name], out / name / "adapter" / "adapter_config.json")
        run([py, "merge.py", "--base", base, "--adapter", out / name / "adapter", "--out", models / name],
            models / name / "config.json")
        return models / name

    def opcd(name, student):
        run([py, "opcd.py", "--model", student, "--teacher", base, "--data", data / "train",
             "--val-data", data / "val", "--out", out / name, "--rollout", args.rollout, "--max-steps", args.opcd_steps,
             "--batch-size", args.opcd_batch, "--lr", args.opcd_lr, "--max-new-tokens", args.max_new_tokens,
             "--val-every", max(1, args.opcd_steps // 3), "--seed", args.seed], out / name / "best" / "config.json")
        return out / name / "best"

    rows = {"base (text-pretrained)": base}
    rows["+ perception SFT"] = perception_sft("psft", "perception")
    rows["+ OPCD (MGSD)"] = opcd("mgsd", rows["+ perception SFT"])
    if args.rows == "all":
        rows["OPCD without perception SFT"] = opcd("opcd-only", base)
        run(sft + ["--model", base, "--kinds", "planning", "--full", "--lr", args.text_lr, "--epochs", args.text_epochs,
                   "--out", out / "visual-sft"], out / "visual-sft" / "model" / "config.json")
        rows["direct visual SFT"] = out / "visual-sft" / "model"
        rows["perception+dynamics SFT, then OPCD"] = opcd("mgsd-dyn", perception_sft("psft-dyn", "perception,dynamics"))

    # Evaluation of every row, image and text conditions, on held-out test seeds.
    results = {}
    for i, (name, model) in enumerate(rows.items()):
        eval_dir = out / "eval" / f"row{i}"  # the row order above is fixed, so a re-run finds its results
        run([py, "evaluate.py", "--model", model, "--data", data / "test", "--backend", "hf", "--condition", "both",
             "--max-new-tokens", args.max_new_tokens, "--batch-size", 32, "--out", eval_dir], eval_dir / "summary.json")
        results[name] = json.loads((eval_dir / "summary.json").read_text())
    table = results_table(results)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "results.png")
    print("\n" + table)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.png'}; wall time {(time.time() - start) / 60:.1f} min")


def results_table(results):
    """One row per model: visual success per task and macro, optimal macro, text macro, gap."""
    header = ["model"] + [f"{t} img" for t in TASKS] + ["macro img", "optimal img", "macro text", "gap (text-img)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, summary in results.items():
        image, text = summary["conditions"]["image"], summary["conditions"]["text"]
        cells = [name] + [f"{100 * image['per_task'][t]['success']:.1f}" if t in image["per_task"] else "-" for t in TASKS]
        cells += [f"{100 * image['macro']['success']:.1f}", f"{100 * image['macro']['optimal']:.1f}",
                  f"{100 * text['macro']['success']:.1f}",
                  f"{100 * (text['macro']['success'] - image['macro']['success']):+.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path):
    """Macro success per model, image vs text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    image = [100 * results[n]["conditions"]["image"]["macro"]["success"] for n in names]
    text = [100 * results[n]["conditions"]["text"]["macro"]["success"] for n in names]
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 2, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], image, width=0.4, label="image (visual planning)")
    ax.bar([x + 0.2 for x in xs], text, width=0.4, label="text (upper bound)")
    ax.set_xticks(list(xs), names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("macro success (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
