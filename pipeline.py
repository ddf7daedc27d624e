"""The main job: the whole MGSD pipeline, end to end, on a small VLM built offline.

It chains the project's own command lines — exactly what a user would type — and prints each
one before running it:

    data        python envs.py data ...            train / val / test splits (images 128 px)
    model       python common.py tiny ...          a random Qwen3-VL of --size, tokenizer trained offline
    base        python sft.py --full ...           text-planning pre-training: the base model learns to plan
                                                   from the symbolic text state (the "instruct model")
    psft        python sft.py --full --train-vision stage 1: perception SFT (full, so nothing to merge.py)
    mgsd        python opcd.py --loss full ...     stage 2: OPCD, teacher = the base model, text only
    eval        python evaluate.py ...             after every stage, image and text conditions

and writes OUT/results.md (a table), OUT/results.json and OUT/results.png (a plot). With
--rows all it also runs the ablations of results/mini/REPORT.md: OPCD without perception SFT,
direct visual SFT on the reference responses, and perception SFT with dynamics QA then OPCD.

Every stage is skipped when its output already exists, so an interrupted run resumes where
it stopped (delete a stage's folder to redo it).

    python pipeline.py                 # the default (small model, 3.3M parameters): 11.5 min on 2 cores
    python pipeline.py --quick         # a smoke run of every stage (1.5 min on 2 cores; CI runs it)
    python pipeline.py --rows all --base runs/mini-base/model --seed 1 --out runs/mini-s1   # one seed of the report

Settings of the default, measured on the val split (results/mini/REPORT.md has the numbers):
- The tiny tokenizer merges the fixed instructions across words (common.TOKENIZER_SPLIT), so
  prompts are ~3x shorter than with a word-level split; tiny models train without gradient
  checkpointing. Together: 1.4 SFT steps of 16 rows per second on 2 cores.
- Text-planning pre-training needs many steps: val text-condition success 14 % after 600 steps,
  41 % after 1200 and 83 % (64 val rows) after 1800 (three legs at lr 2e-3). The default does one
  leg (the 20-minute budget); the report's base does three and is shared by its seeds (--base).
- OPCD uses the exact reverse KL over the vocabulary (--loss full) at lr 3e-4: with the
  reference's sampled estimator (one sample per prompt, lr 1e-4, student = the base) val
  success fell to 0 within 40 steps on this model; with --loss full, lr 3e-4 beat 1e-4 on val.
"""
import argparse
import collections
import importlib.util
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
DEFAULT = dict(size="small", levels="frozenlake=3,4 maze=3 minibehaviour=5", train_per_level=600,
               val_per_level=16, test_per_level=50, text_epochs=4, text_lr=2e-3, perception_epochs=0.67,
               perception_lr=2e-3, opcd_steps=30, opcd_batch=16, opcd_lr=3e-4, max_new_tokens=100)
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
    p.add_argument("--aggregate", nargs="+", metavar="RUN",
                   help="print mean ± std over the results.json of these run folders (seeds) and exit")
    p.add_argument("--base", default=None,
                   help="an existing text-pretrained model folder: skip the model and base stages (several seeds "
                        "of the later stages can then share one base, as they share one instruct model in the paper)")
    p.add_argument("--backend", default=None, choices=("hf", "vllm"),
                   help="engine of OPCD rollouts and evaluation (default: vllm where installed, else hf)")
    p.add_argument("--workers", type=int, default=2, help="processes writing the data")
    p.add_argument("--size", help=f"model size of common.py tiny (default {DEFAULT['size']}, quick {QUICK['size']})")
    p.add_argument("--levels", help=f"levels per task, as task=l1,l2 (default {DEFAULT['levels']!r})")
    explain = dict(train_per_level="train instances per (task, level)", val_per_level="val instances per (task, level)",
                   test_per_level="held-out test instances per (task, level)",
                   text_epochs="epochs of text-planning pre-training", perception_epochs="epochs of perception SFT over perception + replayed text-planning rows "
                                     "(the other SFT rows get the same number of steps)",
                   opcd_steps="OPCD optimiser steps", opcd_batch="OPCD prompts per step",
                   max_new_tokens="response budget in rollouts and evaluation",
                   text_lr="lr of text-planning pre-training (full)", perception_lr="lr of perception SFT and direct visual SFT (whole model)",
                   opcd_lr="OPCD lr (the reference's 1e-6 is for 4B models)")
    for key, text in explain.items():
        p.add_argument("--" + key.replace("_", "-"), type=float if key.endswith(("lr", "epochs")) else int,
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
    if args.aggregate:
        print(aggregate_table(args.aggregate))
        return
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    os.environ.setdefault("OMP_NUM_THREADS", "2")  # the stages inherit it
    backend = args.backend or ("vllm" if importlib.util.find_spec("vllm") else "hf")
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
    # Tiny models: no gradient checkpointing (activations are small; it would cost a third more time).
    sft = [py, "sft.py", "--data", data / "train", "--seed", args.seed, "--batch-size", 16, "--micro-batch-size", 16,
           "--max-new-tokens", args.max_new_tokens, "--no-grad-checkpointing"]
    if args.base:
        base = Path(args.base).resolve()
    else:
        run([py, "common.py", "tiny", "--out", models / "init", "--size", args.size, "--seed", args.seed],
            models / "init" / "config.json")
        run(sft + ["--model", models / "init", "--kinds", "text-planning", "--full", "--lr", args.text_lr,
                   "--epochs", args.text_epochs, "--out", out / "sft-text"], out / "sft-text" / "model" / "config.json")
        base = out / "sft-text" / "model"

    # Perception SFT replays the base's own text-planning rows: on a model this small it otherwise
    # overwrites the answer format (a first run without them parsed 0 % of answers). It trains the
    # whole language model and the vision tower (sft.py --full --train-vision): a LoRA of a 3M model
    # with a frozen random tower stayed at chance on perception questions (measured on val).
    # Every SFT row of the report gets the optimiser steps of perception SFT, whatever its data size.
    rows_of_kind = kind_counts(data / "train")

    def epochs_for(kinds):
        def n(ks):
            return sum(rows_of_kind[k] for k in ks.split(","))
        return round(args.perception_epochs * n("perception,text-planning") / n(kinds), 4)

    def perception_sft(name, kinds):
        kinds += ",text-planning"
        run(sft + ["--model", base, "--kinds", kinds, "--full", "--train-vision", "--lr", args.perception_lr,
                   "--epochs", epochs_for(kinds), "--out", out / name], out / name / "model" / "config.json")
        return out / name / "model"

    def opcd(name, student):
        run([py, "opcd.py", "--model", student, "--teacher", base, "--data", data / "train",
             "--val-data", data / "val", "--out", out / name, "--rollout", backend, "--max-steps", args.opcd_steps,
             "--loss", "full", "--batch-size", args.opcd_batch, "--lr", args.opcd_lr,
             "--max-new-tokens", args.max_new_tokens, "--val-every", max(1, args.opcd_steps // 4), "--seed", args.seed],
            out / name / "best" / "config.json")
        return out / name / "best"

    # Each row is evaluated as soon as it exists (image and text conditions, held-out test seeds).
    results = {}

    def evaluate(name, model):
        eval_dir = out / "eval" / f"row{len(results)}"  # the row order is fixed, so a re-run finds its results
        run([py, "evaluate.py", "--model", model, "--data", data / "test", "--backend", backend, "--condition", "both",
             "--max-new-tokens", args.max_new_tokens, "--batch-size", 32, "--out", eval_dir], eval_dir / "summary.json")
        results[name] = json.loads((eval_dir / "summary.json").read_text())
        return model

    evaluate("base (text-pretrained)", base)
    psft = evaluate("+ perception SFT", perception_sft("psft", "perception"))
    evaluate("+ OPCD (MGSD)", opcd("mgsd", psft))
    if args.rows == "all":
        evaluate("OPCD without perception SFT", opcd("opcd-only", base))
        run(sft + ["--model", base, "--kinds", "planning", "--full", "--train-vision", "--lr", args.perception_lr,
                   "--epochs", epochs_for("planning"), "--out", out / "visual-sft"],
            out / "visual-sft" / "model" / "config.json")
        evaluate("direct visual SFT", out / "visual-sft" / "model")
        evaluate("perception+dynamics SFT, then OPCD", opcd("mgsd-dyn", perception_sft("psft-dyn", "perception,dynamics")))
    table = results_table(results)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "results.png")
    print("\n" + table)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.png'}; wall time {(time.time() - start) / 60:.1f} min")


def kind_counts(split):
    """Rows per kind in split/data.jsonl."""
    with open(Path(split) / "data.jsonl") as f:
        return collections.Counter(json.loads(line)["kind"] for line in f)


def aggregate_table(run_dirs):
    """Mean ± standard deviation over runs (seeds) of every number of results_table, per row name:
    visual success and optimal per task and macro, text macro success, and the gap."""
    import statistics

    runs = [json.loads((Path(d) / "results.json").read_text()) for d in run_dirs]
    names = [n for n in runs[0] if all(n in r for r in runs)]

    def cell(values):
        values = [100 * v for v in values]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.1f} ± {std:.1f}"

    tasks = [t for t in TASKS if t in runs[0][names[0]]["conditions"]["image"]["per_task"]]
    header = (["model"] + [f"{t} img success / optimal" for t in tasks]
              + ["macro img success", "macro img optimal", "macro text success", "gap (text − img)"])
    lines = [f"mean ± std over {len(runs)} runs: " + ", ".join(str(d) for d in run_dirs), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        image = [r[name]["conditions"]["image"] for r in runs]
        text = [r[name]["conditions"]["text"] for r in runs]
        cells = [name] + [cell([i["per_task"][t]["success"] for i in image]) + " / "
                          + cell([i["per_task"][t]["optimal"] for i in image]) for t in tasks]
        cells += [cell([i["macro"]["success"] for i in image]), cell([i["macro"]["optimal"] for i in image]),
                  cell([t["macro"]["success"] for t in text]),
                  cell([t["macro"]["success"] - i["macro"]["success"] for t, i in zip(text, image)])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
