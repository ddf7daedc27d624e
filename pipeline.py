"""The main job: MGSD end to end, in miniature, on a tiny Qwen3-VL built here (results/mini/REPORT.md).

It runs the project's own command lines, printing each first: `envs.py data` (train / val / test, 32-px cells
on 160-px pictures); stage 1, `sft.py --full` (perception SFT with replayed text planning); stage 2,
`opcd.py --loss full` (teacher: the base reading the state as text; 32 prompts a step, the paper's 16 image
prompts and 16 in which the student reads the text state, --text-share 0.5, chosen on val); `evaluate.py`
after every stage, image and text. The console shows each command, a bar and its wall time; what a stage prints
goes to a log beside its output (e.g. OUT/logs/mgsd.log, OUT/eval/logs/row2.log), named if it fails. Out:
OUT/results.md, results.json and results.png. Every stage is skipped when its output exists, so an interrupted
run resumes. The shipped base (models/mini-base, 3.5M) was trained from random weights by sft.py
(pretrain_commands): first to read generic grid pictures (mgsd/grids.py), then to plan from the text state; it
never saw a task picture. --pretrain rebuilds it (~75 min on 2 cores). --rows baselines adds the paper's
baselines (answer-only visual SFT, RL on the success reward, each visual SFT then OPCD) and held-out levels;
--rows all also the report's ablations (OPCD as in the paper, the sampled estimator, no perception SFT, a
teacher without the state, + dynamics SFT).

    python pipeline.py                          # the main job, from the shipped base
    python pipeline.py --quick                  # every stage, tiny sizes (CI runs it)
    python pipeline.py --rows all --seed 1 --out runs/mini-s1      # one seed of the report
    python pipeline.py --aggregate runs/mini-s0 runs/mini-s1 runs/mini-s2
"""
import importlib.util
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from envs import TASKS
from mgsd import cli, gallery, splits, tracking

ROOT = Path(__file__).resolve().parent
SHIPPED_BASE = ROOT / "models" / "mini-base"
BASE_STEPS = 5722  # the shipped base's second pretraining run: 6.3 passes over its 14,500 rows
IMAGE_SIZE, CELL_SIZE = 160, 32  # one merged vision token per cell (mgsd/tiny.py's layout)
HELDOUT = "frozenlake=5 maze=4 minibehaviour=4"  # a level per task that no stage trains on; its picture fits the canvas
HELDOUT_PER_LEVEL = 40  # MiniBehaviour 4 (a 2x3 table in a 4x4 room) has 44 distinct test instances
PICTURE = ["--image-size", IMAGE_SIZE, "--cell-size", CELL_SIZE]

# Settings of the main job and of --quick, chosen on the val split (results/mini/REPORT.md).
DEFAULT = dict(levels="frozenlake=4 maze=3 minibehaviour=5", train_per_level=600, val_per_level=32,
               test_per_level=170, perception_steps=800, perception_lr=5e-4, opcd_steps=200, opcd_batch=32,
               opcd_lr=1e-4, opcd_text_share=0.5, max_new_tokens=100)
QUICK = dict(levels="frozenlake=4 maze=3 minibehaviour=5", train_per_level=16, val_per_level=2, test_per_level=3,
             perception_steps=2, perception_lr=5e-4, opcd_steps=2, opcd_batch=4, opcd_lr=1e-5, opcd_text_share=0.25,
             max_new_tokens=48)
HELP = dict(levels="levels per task, as task=l1,l2", train_per_level="train instances per (task, level)",
            val_per_level="val instances per (task, level), for OPCD checkpoint selection",
            test_per_level="held-out test instances per (task, level)",
            perception_steps="optimiser steps (16 rows) of every SFT row: perception SFT, visual SFT, +dynamics",
            perception_lr="lr of perception SFT and direct visual SFT", opcd_steps="OPCD optimiser steps",
            opcd_batch="OPCD prompts per step", opcd_lr="OPCD lr (the reference's 1e-6 is for 4B models)",
            opcd_text_share="share of OPCD prompts in which the student reads the state as text (opcd.py --text-share, "
                            "a rehearsal of text planning; 0 with --opcd-batch 16: the paper's OPCD)",
            max_new_tokens="response budget of rollouts and evaluation")


def parse_args(argv=None):
    p = cli.Parser(prog="pipeline.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/mini", help="run folder; stages already there are skipped (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and a freshly built tiny base: a smoke run")
    p.add_argument("--rows", default="mgsd", choices=("mgsd", "baselines", "all", "served"),
                   help="mgsd: base, +perception SFT, +OPCD; baselines: also the paper's baselines (answer-only visual SFT, "
                        "visual SFT on reference responses, RL on the success reward, each SFT then OPCD) and every row "
                        f"on held-out levels ({HELDOUT}); all: also the report's ablations; served: also MGSD with the "
                        "teacher behind vllm serve and --loss topk --topk 20 (default %(default)s)")
    p.add_argument("--seed", type=cli.seed, default=0, help="seed of SFT order and OPCD sampling (default %(default)s)")
    p.add_argument("--base", default=None, help=f"base model folder (default: the shipped {SHIPPED_BASE.relative_to(ROOT)})")
    p.add_argument("--pretrain", action="store_true", help="build the base from random weights into OUT/base instead "
                                                              f"of using {SHIPPED_BASE.relative_to(ROOT)}")
    p.add_argument("--base-steps", type=cli.positive_int, default=None,
                   help=f"optimiser steps (16 rows) of the base's second pretraining run (default {BASE_STEPS}, quick 8)")
    p.add_argument("--aggregate", nargs="+", metavar="RUN", help="print mean ± std over these run folders and exit")
    p.add_argument("--backend", default=None, choices=("hf", "vllm"),
                   help="engine of OPCD rollouts and evaluation (default: vllm where installed, else hf)")
    p.add_argument("--report-to", default="none", choices=tracking.CHOICES,
                   help="the SFT and OPCD stages also send their logs to this tracker (default %(default)s)")
    for key, text in HELP.items():
        kind = (str if key == "levels" else cli.positive_float if key.endswith("lr") else cli.fraction
                if key.endswith("share") else cli.positive_int)
        p.add_argument("--" + key.replace("_", "-"), type=kind, help=f"{text} (default {DEFAULT[key]}, quick {QUICK[key]})")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULT).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.base and (args.pretrain or args.quick):
        p.error("--base cannot be combined with --pretrain or --quick (they build their own base)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file")
    missing = [run for run in args.aggregate or () if not (Path(run) / "results.json").is_file()]
    if missing:
        p.error(f"--aggregate: no results.json in {missing[0]}")
    try:
        settings = [(run, json.loads((Path(run) / "settings.json").read_text())) for run in args.aggregate or ()
                    if (Path(run) / "settings.json").is_file()]
        if not all(isinstance(saved, dict) for _, saved in settings):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        p.error(f"--aggregate: a settings.json is not a pipeline's settings ({type(e).__name__})")
    for run, theirs in settings[1:]:  # a mean over unlike runs would mean nothing
        differ = sorted(k for k in set(theirs) | set(settings[0][1]) if k not in ("seed", "out", "rows", "aggregate", "report_to")
                        and theirs.get(k) != settings[0][1].get(k))
        if differ:
            p.error(f"--aggregate: {run} was made with other settings than {settings[0][0]} ("
                    + ", ".join(f"--{k.replace('_', '-')} {settings[0][1].get(k)} -> {theirs.get(k)}" for k in differ) + ")")
    try:  # the levels as envs.py data reads them, checked before any stage runs
        levels = splits.level_table(TASKS, splits.parse_levels(args.levels.split()))
        splits.check_request(TASKS, levels, [], IMAGE_SIZE, CELL_SIZE)
    except ValueError as e:
        p.error(str(e))
    args.base = str(Path(args.base).resolve()) if args.base else None
    args.base_steps = args.base_steps or (8 if args.quick else BASE_STEPS)
    return args


PROGRESS = re.compile(rb"(\d+)/(\d+) (?:\[|episodes)")  # a stage's tqdm bar, or evaluate.py's episode count


def run(cmd, done_marker):
    """Run one stage's command unless its output exists. The command is printed; everything the stage prints
    (transformers, vLLM, its own bars) goes to a log beside its --out folder, LOGS/<name>.log, named if the stage
    fails; here a bar follows the stage's progress, then its wall time is printed."""
    if Path(done_marker).exists():
        print(f"[skip] {done_marker} exists")
        return
    cmd = [str(c) for c in cmd]
    out = Path(cmd[cmd.index("--out") + 1])
    log = out.parent / "logs" / f"{out.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shlex.join(cmd), flush=True)
    start = time.time()
    with open(log, "wb") as f, tqdm(desc=f"  {out.name}", leave=False, dynamic_ncols=True) as bar:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
                f.write(chunk)
                f.flush()
                if found := PROGRESS.findall(chunk):
                    bar.total, bar.n = int(found[-1][1]), int(found[-1][0])
                    bar.refresh()
            code = proc.wait()
        except KeyboardInterrupt:  # the stage stops with the pipeline (its own Ctrl-C handling keeps its state)
            proc.send_signal(signal.SIGINT)
            proc.wait()
            raise
    if code:
        last = next((line for line in reversed(log.read_text(errors="replace").splitlines()) if line.strip()), "")
        cli.fail(f"stage failed: {shlex.join(cmd)}: {last.strip()} (its output: {log})")
    print(f"  ({time.time() - start:.0f} s)", flush=True)


def epochs_for(steps, rows):
    """The --epochs that makes sft.py (batch 16, int(rows // 16 * epochs) steps) run exactly `steps` steps."""
    return round((steps + 0.5) / (rows // 16), 6)


def pretrain_commands(out, steps, quick=False):
    """[(command, done marker)] that build the base from random weights, in two SFT runs of the language
    model at lr 5e-4 with the random vision tower frozen (see sft() in main): `see`, 1,500 steps of generic
    grid pictures only (mgsd/grids.py; learned in ~1,000 steps alone, never when mixed in from the start), then
    `plan`, `steps` steps of text planning and teacher-prompt rows with a sixth of grid rows kept in."""
    py, d = sys.executable, out / "data"
    grids, text_per_level, teacher_per_level, see_steps = (64, 8, 8, 4) if quick else (12000, 3000, 700, 1500)
    # The shipped base's BPE was trained on the prompts of its day (MiniBehaviour's picture legend has changed
    # since); keeping it makes the rebuild the shipped base.
    keep = [] if quick or not (SHIPPED_BASE / "tokenizer.json").is_file() else ["--tokenizer", SHIPPED_BASE]
    cmds = [([py, "-m", "mgsd.tiny", "model", "--out", out / "init", "--size", "tiny" if quick else "small", "--image-size", 160,
              "--seed", 0, *keep], out / "init" / "config.json"),
            ([py, "-m", "mgsd.tiny", "grids", "--out", d / "grids-train", "--split", "train", "--count", grids], d / "grids-train"),
            ([py, "-m", "mgsd.tiny", "grids", "--out", d / "grids-replay", "--split", "train", "--count", grids // 6],
             d / "grids-replay"),
            ([py, "-m", "mgsd.tiny", "grids", "--out", d / "grids-val", "--split", "val", "--count", 8 if quick else 150],
             d / "grids-val")]
    # FrozenLake 3x3 has only ~770 distinct train maps, so it gets its own, smaller split.
    # The teacher rows (the teacher's prompt, state and reference plan as text) teach the base to read the
    # prompt it gets as OPCD's teacher; a real instruct model reads any prompt.
    for name, per_level, kinds, levels in (
            ("text-train", text_per_level, "text-planning", ["frozenlake=4", "maze=3", "minibehaviour=5"]),
            ("text-train-fl3", min(700, text_per_level), "text-planning", ["frozenlake=3"]),
            ("teacher-train", teacher_per_level, "teacher", ["frozenlake=3,4", "maze=3", "minibehaviour=5"])):
        tasks = [level.split("=")[0] for level in levels]
        cmds.append(([py, "envs.py", "data", "--out", d / name, "--split", "train", "--per-level", per_level,
                      "--kinds", kinds, "--tasks", *tasks, "--levels", *levels], d / name / "data.jsonl"))
    cmds.append(([py, "envs.py", "data", "--out", d / "text-val", "--split", "val", "--per-level", 2 if quick else 16,
                  "--kinds", "text-planning", "--levels", "frozenlake=3,4", "maze=3", "minibehaviour=5"],
                 d / "text-val" / "data.jsonl"))
    common = ["--full", "--lr", 5e-4, "--warmup-ratio", 0.03, "--batch-size", 16, "--micro-batch-size", 16,
              "--no-grad-checkpointing", "--save-every", 250, "--seed", 0]
    plan_rows = 3 * text_per_level + min(700, text_per_level) + 4 * teacher_per_level + grids // 6
    for phase, model, data, val, kinds, n_steps, rows in (
            ("see", out / "init", [d / "grids-train"], [d / "grids-val"], "vision", see_steps, grids),
            ("plan", out / "see" / "model", [d / "grids-replay", d / "text-train", d / "text-train-fl3", d / "teacher-train"],
             [d / "text-val", d / "grids-val"], "vision,text-planning,teacher", steps, plan_rows)):
        resume = ["--resume"] if (out / phase / "checkpoint" / "state.json").is_file() else []
        cmds.append(([py, "sft.py", "--model", model, "--data", *data, "--val-data", *val, "--kinds", kinds,
                      "--epochs", epochs_for(n_steps, rows), *common, "--val-every", 500,
                      "--val-size", 16 if quick else 128, "--max-new-tokens", 100, "--out", out / phase, *resume],
                     out / phase / "model" / "config.json"))
    return cmds


def main(argv=None):
    args = parse_args(argv)
    if args.aggregate:
        try:
            print(aggregate_table(args.aggregate))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as e:
            cli.fail(f"--aggregate: a results.json is not a pipeline's results ({type(e).__name__}: {str(e)[:80]})")
        return
    tracking.check_installed(args.report_to)
    base = Path(args.base) if args.base else SHIPPED_BASE
    build = not args.base and (args.pretrain or args.quick or not SHIPPED_BASE.is_dir())
    if not build and not (base / "config.json").is_file():  # before anything is written
        cli.fail(f"no model in {base} (see --base / --pretrain)")
    out = Path(args.out).resolve()
    foreign = next((script for script in cli.RUN_MARKS if script != "pipeline.py" and cli.holds_run(out, script)), None)
    if foreign or out == base.resolve() or out in base.resolve().parents:
        what = "the base model" if not foreign else "a model" if foreign == "merge.py" else f"a run of {foreign}"
        cli.fail(f"--out {out} holds {what}; choose another --out")
    if base.resolve() in out.parents:
        cli.fail(f"--out {out} lies inside the base model {base}; choose another --out")
    if out.exists() and not out.is_dir():
        cli.fail(f"--out {out} is a file")
    if out.is_dir() and not (out / "settings.json").is_file() and any(not p.name.startswith(".") for p in out.iterdir()):
        cli.fail(f"--out {out} holds other files than a pipeline run's; choose an empty or new folder")
    if (out / "settings.json").is_file():  # a re-run with other settings would silently reuse stages made with these
        try:
            saved = json.loads((out / "settings.json").read_text())
            if not isinstance(saved, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError) as e:
            cli.fail(f"{out / 'settings.json'} is not a pipeline's settings ({e}); move it away or choose another --out")
        cli.check_resume(saved, args, {"out", "rows", "aggregate", "report_to"}, what=f"a re-run in {out}")
    cli.claim_out(out)
    (out / "settings.json").write_text(json.dumps(vars(args), indent=1) + "\n")
    py = sys.executable
    os.environ.setdefault("OMP_NUM_THREADS", "2")  # the stages inherit it
    backend = args.backend or ("vllm" if importlib.util.find_spec("vllm") else "hf")
    start = time.time()
    data, levels = out / "data", args.levels.split()

    if build:
        print(f"building the base: {args.base_steps} steps of pretraining")
        for cmd, done in pretrain_commands(out / "base", args.base_steps, args.quick):
            run(cmd, done)
        base = out / "base" / "plan" / "model"

    # Data: perception and text-planning rows for stage 1, planning rows whose prompts OPCD samples from
    # (their reference responses are used only by direct visual SFT), dynamics rows for that ablation;
    # val rows select OPCD checkpoints; test rows are held out for the tables.
    wanted = [("train", "train", args.train_per_level, "perception,text-planning,planning"),
              ("val", "val", args.val_per_level, "planning,perception"),
              ("test", "test", args.test_per_level, "planning,perception")]
    # Rows of the other runs live apart, so that a main-job run can be extended.
    heldout = args.rows in ("baselines", "all")
    if heldout:  # the answer-only SFT's rows, and test instances of levels no stage trains on
        wanted += [("direct", "train", args.train_per_level, "planning-direct", levels),
                   ("heldout", "test", min(HELDOUT_PER_LEVEL, args.test_per_level), "planning", HELDOUT.split())]
    if args.rows == "all":
        wanted.append(("dynamics", "train", args.train_per_level, "dynamics"))
    for folder, split, n, kinds, *which in wanted:
        run([py, "envs.py", "data", "--out", data / folder, "--split", split, "--per-level", n, "--kinds", kinds,
             "--levels", *(which[0] if which else levels), *PICTURE, "--workers", 2], data / folder / "data.jsonl")

    rows_of_kind = {}
    for name in ("train", "direct", "dynamics"):
        if not (data / name / "data.jsonl").is_file():
            continue
        for line in open(data / name / "data.jsonl"):
            kind = json.loads(line)["kind"]
            rows_of_kind[kind] = rows_of_kind.get(kind, 0) + 1

    def sft(name, student, kinds):
        """Full SFT of the language model for --perception-steps steps of 16 rows over `kinds`. The random
        vision tower stays frozen and the lr low: trained at 2e-3 the tiny model never learned to read
        positions, and training the tower erased them from it (results/mini/REPORT.md, 2026-11-27)."""
        epochs = epochs_for(args.perception_steps, sum(rows_of_kind[k] for k in kinds.split(",")))
        folders = [data / "train"] + [data / folder for folder, kind in (("dynamics", "dynamics"), ("direct", "planning-direct"))
                                      if kind in kinds.split(",")]
        run([py, "sft.py", "--model", student, "--data", *folders, "--val-data", data / "val", "--kinds", kinds,
             "--full", "--lr", args.perception_lr, "--epochs", epochs, "--batch-size", 16,
             "--micro-batch-size", 16, "--no-grad-checkpointing", "--val-size", 64, "--max-new-tokens",
             args.max_new_tokens, "--seed", args.seed, "--out", out / name, "--overwrite", "--report-to", args.report_to],
            out / name / "model" / "config.json")
        return out / name / "model"

    def opcd(name, student, *extra):
        """best/ exists from OPCD's first validation on: an interrupted run is resumed from last/, not taken
        as done (the resume is exact, opcd.py)."""
        resume = "--resume" if (out / name / "last" / "trainer_state.pt").is_file() else "--overwrite"
        run([py, "opcd.py", "--model", student, "--teacher", base, "--data", data / "train", "--val-data", data / "val",
             "--out", out / name, "--rollout", backend, "--max-steps", args.opcd_steps, "--batch-size", args.opcd_batch,
             "--lr", args.opcd_lr, "--max-new-tokens", args.max_new_tokens, "--val-every", max(1, args.opcd_steps // 4),
             "--seed", args.seed, "--loss", "full", "--no-grad-checkpointing", resume, "--text-share",
             args.opcd_text_share, "--report-to", args.report_to, *extra],
            out / name / "done.json")
        return out / name / "best"

    results = {}

    def evaluate(name, model, direct=False):
        """Test planning from the image and from text, perception, and (--rows baselines / all) planning on the
        held-out levels. direct: the answer-only image prompt of the models trained on planning-direct rows."""
        summaries, prompt = {}, ["--image-prompt", "direct"] if direct else []
        for part, split, what in (("", "test", ["--condition", "both", *prompt]), ("perception", "test", ["--kind", "perception"]),
                                  ("heldout", "heldout", ["--condition", "both", *prompt]))[:3 if heldout else 2]:
            eval_dir = out / "eval" / f"row{len(results)}{'-' + part if part else ''}"  # the row order is fixed
            run([py, "evaluate.py", "--model", model, "--data", data / split, "--backend", backend, *what,
                 "--max-new-tokens", args.max_new_tokens, "--batch-size", 32, "--out", eval_dir, "--overwrite"],
                eval_dir / "summary.json")
            summaries[part] = json.loads((eval_dir / "summary.json").read_text())
        results[name] = {**summaries.pop(""), **summaries}
        return model

    # ALGO: the two stages of MGSD, evaluated after each.
    evaluate("base", base)
    psft = evaluate("+ perception SFT", sft("psft", base, "perception,text-planning"))
    evaluate("+ OPCD (MGSD)", opcd("mgsd", psft))
    gallery.compare(splits.load_split(data / "test", kinds=["planning"]), *(
        [json.loads(x) for x in (out / "eval" / row / "episodes.jsonl").read_text().splitlines()] for row in ("row1", "row2")),
        out / "gallery.png")  # stage 1 and MGSD on the same test instances
    if args.rows in ("baselines", "all"):  # the paper's baselines, from the base or stage 1 as the paper's
        direct_sft = evaluate("answer-only visual SFT (the paper's direct SFT)",
                              sft("direct-sft", base, "planning-direct,text-planning"), direct=True)
        visual_sft = evaluate("visual SFT on reference responses (recap + plan)",
                              sft("visual-sft", base, "planning,text-planning"))
        # RL on the success reward alone, from stage 1 as MGSD: 8 prompts x 4 samples = MGSD's 32 rollouts a step.
        evaluate("RL on the success reward (GRPO, no teacher)",
                 opcd("grpo", psft, "--teacher", "none", "--loss", "sampled", "--reward-coef", 1,
                      "--samples-per-prompt", 4, "--batch-size", args.opcd_batch // 4))
        evaluate("answer-only visual SFT, then OPCD", opcd("direct-sft-opcd", direct_sft, "--image-prompt", "direct"),
                 direct=True)
        evaluate("visual SFT on reference responses, then OPCD", opcd("visual-sft-opcd", visual_sft))
    if args.rows == "all":
        evaluate("OPCD as in the paper (16 image prompts, no rehearsal)",
                 opcd("mgsd-paper", psft, "--batch-size", 16, "--text-share", 0))
        evaluate("MGSD, sampled estimator", opcd("mgsd-sampled", psft, "--loss", "sampled"))
        evaluate("OPCD without perception SFT", opcd("opcd-only", base))
        evaluate("OPCD, teacher without privileged state", opcd("mgsd-noprivilege", psft, "--teacher-context", "image"))
        evaluate("perception+dynamics SFT, then OPCD",
                 opcd("mgsd-dyn", sft("psft-dyn", base, "perception,dynamics,text-planning")))
    if args.rows == "served":  # the teacher in its own process (opcd.py --teacher-url), the top-20 KL
        name, server = "mgsd-served", None
        if not (out / name / "done.json").is_file():
            from mgsd import common  # torch: only here, so that the main job's own process stays light

            print(f"+ vllm serve {base} (the teacher)", flush=True)
            server, url = common.start_server(base, str(base), max_model_len=4096, max_logprobs=20)
        try:
            evaluate("MGSD, served teacher, --loss topk --topk 20",
                     opcd(name, psft, "--loss", "topk", "--topk", 20, "--teacher-url", url if server else "-"))
        finally:
            if server:
                server.terminate()
                server.wait(timeout=60)
    table = results_table(results)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "results.png")
    print("\n" + table)
    print(f"\nwrote {out / 'results.md'}, {out / 'results.png'}; wall time {(time.time() - start) / 60:.1f} min")


POSITIONS = {"frozenlake": ("player", "goal"), "maze": ("player", "target"), "minibehaviour": ("agent", "printer")}


def row_cells(summary):
    """The numbers of one table row (fractions): visual success per task, macro image / text success,
    the gap, the mean accuracy of the position questions (player/goal/target/agent/printer), and where
    evaluated, macro image / text success on the held-out levels."""
    image, text = summary["conditions"]["image"], summary["conditions"]["text"]
    per_task = summary["perception"]["conditions"]["image"]["per_task"]
    positions = [per_task[t][q] for t in POSITIONS if t in per_task for q in POSITIONS[t]]
    heldout = [summary["heldout"]["conditions"][c]["macro"]["success"] for c in ("image", "text")] if "heldout" in summary else []
    return ([image["per_task"][t]["success"] if t in image["per_task"] else float("nan") for t in TASKS]
            + [image["macro"]["success"], image["macro"]["optimal"], text["macro"]["success"],
               text["macro"]["success"] - image["macro"]["success"], sum(positions) / len(positions)] + heldout)


HEADER = ["model"] + [f"{t} img" for t in TASKS] + ["macro img", "optimal img", "macro text", "gap (text − img)",
                                                    "position questions"]
HELDOUT_HEADER = ["held-out macro img", "held-out macro text"]


def markdown(rows):
    """A markdown table over [(model name, [cell text])], with the held-out columns where every row has them."""
    width = min(len(cells) for _, cells in rows) if rows else 0
    header = HEADER + HELDOUT_HEADER[:width + 1 - len(HEADER)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join([name] + cells[:len(header) - 1]) + " |" for name, cells in rows])


def results_table(results):
    return markdown([(name, [f"{100 * v:.1f}" for v in row_cells(summary)]) for name, summary in results.items()])


def aggregate_table(run_dirs):
    """Mean ± standard deviation over runs (seeds) of every number of results_table."""
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in run_dirs]
    rows = []
    for name in [n for n in runs[0] if all(n in r for r in runs)]:
        columns = zip(*(row_cells(r[name]) for r in runs))
        rows.append((name, [f"{100 * statistics.mean(c):.1f} ± {100 * (statistics.stdev(c) if len(c) > 1 else 0):.1f}"
                            for c in columns]))
    return f"mean ± std over {len(runs)} runs: " + ", ".join(map(str, run_dirs)) + "\n\n" + markdown(rows)


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
    cli.interruptible(main, "a re-run of the same command continues from the finished stages")
