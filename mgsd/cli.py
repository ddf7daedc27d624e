"""One way to fail, shared by every script: argument checks at parse time, one line on stderr, exit code 2,
nothing written; --out checks, resume checks and atomic folder writes. No torch here, so that evaluate.py's
API path stays light."""
import argparse
import json
import math
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path


def fail(message):
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


def interruptible(main, hint):
    """Run a script's main; Ctrl-C is one line and exit code 130, not a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        print(f"\nerror: interrupted; {hint}", file=sys.stderr, flush=True)
        sys.exit(130)


class _ShowDefaults(argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block) and whose --help shows every default."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", _ShowDefaults)
        super().__init__(**kwargs)

    def error(self, message):
        fail(f"{self.prog}: {message}")


def _number(kind, low, low_open, text, high=math.inf, high_open=False):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < low or (low_open and value == low) or value > high or (high_open and value == high):
        raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}"
                                         + (f" and {'<' if high_open else '<='} {high}" if high < math.inf else "")
                                         + f", got {text}")
    return value


positive_int = lambda text: _number(int, 0, True, text)  # noqa: E731  argparse types: bad values fail at parse time
nonneg_int = lambda text: _number(int, 0, False, text)  # noqa: E731
positive_float = lambda text: _number(float, 0.0, True, text)  # noqa: E731
nonneg_float = lambda text: _number(float, 0.0, False, text)  # noqa: E731
fraction = lambda text: _number(float, 0.0, False, text, high=1)  # noqa: E731
probability = lambda text: _number(float, 0.0, True, text, high=1)  # noqa: E731  (0, 1]: top-p
beta = lambda text: _number(float, 0.0, False, text, high=1, high_open=True)  # noqa: E731  [0, 1): Adam's betas
epochs = lambda text: _number(float, 0.0, True, text, high=1e6)  # noqa: E731
rank = lambda text: _number(int, 0, False, text, high=4096)  # noqa: E731  LoRA ranks past any model's width fail
backoff_seconds = lambda text: _number(float, 0.0, False, text, high=600)  # noqa: E731
positive_rank = lambda text: _number(int, 0, True, text, high=4096)  # noqa: E731


def names(text):
    """A comma-separated list ("perception,planning"): items stripped, none empty or repeated; returned joined."""
    items = [item.strip() for item in text.split(",")]
    if not all(items) or len(set(items)) < len(items):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated names, got {text!r}")
    return ",".join(items)


# What marks a folder as a run of each script: the file it writes first, and a key that file holds.
RUN_MARKS = {"sft.py": ("args.json", "kinds"), "opcd.py": ("args.json", "teacher"), "evaluate.py": ("run.json", "kind"),
             "merge.py": ("config.json", None), "pipeline.py": ("settings.json", "rows")}


def holds_run(folder, script):
    """Whether `folder` holds a run of `script` (its RUN_MARKS file, with its key)."""
    name, key = RUN_MARKS[script]
    try:
        saved = json.loads((Path(folder) / name).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and (key is None or key in saved)


def check_out(out, resume=False, overwrite=False, inputs=(), script=None):
    """Refuse an --out that would silently mix two runs, destroy an input, or cannot be written; writes nothing.
    An --out that is, contains or lies inside an input (data, model, teacher, ...) is always refused; a
    non-empty folder needs --resume (continue it) or --overwrite (replace it), and both accept only a
    folder that holds a run of `script`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file")
    here = out.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue  # a hub id, or an input whose own check reports it
        there = Path(given).resolve()
        relation = "is" if here == there else "contains" if here in there.parents else "lies inside" \
            if there in here.parents else None
        if relation:
            fail(f"--out {out} {relation} the input {given}; choose another --out")
    if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(".")):
        if not (resume or overwrite):
            fail(f"--out {out} already holds a run; --resume continues it, --overwrite replaces it")
        if script and not holds_run(out, script):
            fail(f"--out {out} does not hold a run of {script}; {'--resume' if resume else '--overwrite'} "
                 f"accepts only a folder that {script} wrote")
    anchor = next(p for p in [out, *out.parents] if p.exists())
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        fail(f"--out {out}: cannot write into {anchor}")


def check_resume(saved_args, args, safe, what="--resume"):
    """Fail when a resumed run's settings differ from the saved ones, except the `safe` ones."""
    now = json.loads(json.dumps(vars(args)))  # tuples -> lists, as saved

    def same(a, b):  # a path given as data/ or data is the same setting
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(map(same, a, b))
        return a == b or (isinstance(a, str) and isinstance(b, str) and a and b and os.path.normpath(a) == os.path.normpath(b))

    changed = sorted(k for k in set(saved_args) | set(now) if k not in safe and not same(saved_args.get(k), now.get(k)))
    if changed:
        fail(f"{what} with other settings than the saved run: " + ", ".join(
            f"--{k.replace('_', '-')} {saved_args.get(k)} -> {now.get(k)}" for k in changed)
             + f" (safe to change: {', '.join('--' + k.replace('_', '-') for k in sorted(safe))})")


def recover_dir(path):
    """Clean up after an atomic_dir write that was killed: a half-written `.NAME.tmp-PID` is removed,
    and if the kill fell between the two renames (NAME gone, `.NAME.old-PID` present) the old
    folder is put back. Called at start-up and before every write."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for leftover in sorted(path.parent.glob(f".{path.name}.old-*")):
        if not path.exists():
            os.replace(leftover, path)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def atomic_dir(path):
    """Yield a temporary sibling folder; on success it replaces `path`, on error it is deleted.
    A reader never sees a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def check_opcd_options(args):
    """opcd.py's flags that do not go together: one line, exit 2."""
    if args.loss != "sampled" and (args.reward_coef or args.updates_per_batch > 1):
        fail("--reward-coef and --updates-per-batch > 1 need --loss sampled")
    if args.teacher == "none" and (not args.reward_coef or args.teacher_url or args.teacher_context != "privileged"):
        fail("--teacher none trains on the success reward alone: it needs --reward-coef > 0, no --teacher-url and "
                 "no --teacher-context")
    if args.fsdp and (args.loss != "sampled" or args.lora_rank):
        fail("--fsdp supports neither --loss full / topk nor --lora-rank")
    if args.teacher_url and (args.loss == "full" or args.teacher == "live" or args.temperature != 1.0
                             or args.teacher_context == "image"):
        fail("--teacher-url serves the log-probs of T 1 of a separate model: it needs --loss sampled or topk, "
                 "--temperature 1, a named --teacher and --teacher-context privileged")
