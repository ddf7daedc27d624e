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
seed = lambda text: _number(int, 0, False, text, high=2 ** 32 - 1)  # noqa: E731  numpy's seeds are 32-bit
lora_alpha = lambda text: _number(float, 0.0, True, text, high=1e6)  # noqa: E731
learning_rate = lambda text: _number(float, 0.0, True, text, high=1.0)  # noqa: E731  past 1: every step moves weights by >1
timeout_seconds = lambda text: _number(float, 0.0, True, text, high=86400)  # noqa: E731  a day at most


def http_url(text):
    """An http(s) URL with a host: never file:// or another scheme that urllib would open."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  raises ValueError on a port that is not a number
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a URL: {text!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text


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
    if out.is_symlink() and not out.exists():
        fail(f"--out {out} is a symbolic link to nothing; remove it or choose another --out")
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
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK) or not _can_make_folder(anchor):
        fail(f"--out {out}: cannot write into {anchor}")


def _can_make_folder(parent):
    """Whether a folder can be made in `parent` (os.access says yes for root in /proc and on read-only mounts)."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".mgsd-probe-"))
        return True
    except OSError:
        return False


class NonFinite(ValueError):
    """A NaN or an infinity where training would take it for a number: a gradient, a weight to be written."""


def require_finite(tensors, where):
    """NonFinite naming the first tensor of `tensors` ({name: tensor}) that holds a NaN or an infinity: loaders and
    every writer of weights call it, so that no non-finite weight is trained from or ever reaches a checkpoint."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise NonFinite(f"{where}: {len(bad)} of {len(tensors)} tensors hold NaN or inf (e.g. {bad[0]})")


_CLAIMS = {}  # run folder -> the descriptor of its lock, held by this process until it ends (or claims it again)


def claim_out(out, clear=False):
    """Make `out` this process's run folder: an exclusive lock on the folder itself (flock; no file is written, and
    it is released when the process ends, however it ends) refuses a second run into the same folder in one line;
    then, with clear (--overwrite), what the folder holds is removed (the folder, and so the lock, stays)."""
    import fcntl

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = str(out.resolve())
    if key in _CLAIMS:  # a run of this same process (tests call main in turn): its lock is ours to take back
        os.close(_CLAIMS.pop(key))
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        fail(f"--out {out} is in use by another run; wait for it to end or choose another --out")
    _CLAIMS[key] = fd
    for p in out.iterdir() if clear else []:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def check_out_file(out, overwrite=False):
    """An output file: refused when it is a folder, or exists and overwrite is not given."""
    out = Path(out)
    if out.is_dir():
        fail(f"--out {out} is a folder; name a file")
    if out.exists() and not overwrite:
        fail(f"--out {out} exists; --overwrite replaces it")


def saved_args(path):
    """A run's saved settings (args.json) as a dict, or one line and exit 2."""
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        fail(f"--resume: cannot read {path} ({type(e).__name__})")
    if not isinstance(saved, dict):
        fail(f"--resume: {path} does not hold a run's settings")
    return saved


def check_data(out, args):
    """With --resume, the rows the run started with: the data.jsonl fingerprint args.data_sha256 against the one saved
    in OUT/args.json (runs saved before it was recorded pass)."""
    saved = saved_args(Path(out) / "args.json") if args.resume else {}
    if saved.get("data_sha256", args.data_sha256) != args.data_sha256:
        fail(f"--resume: --data holds other rows than when the run started (data.jsonl sha256 "
             f"{saved['data_sha256'][:12]} -> {args.data_sha256[:12]}); start a new run")


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
def write_failure(path):
    """A failed write as an OSError naming `path`: safetensors and torch.save raise their own types when the disk
    is full."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        raise OSError(f"cannot write {path}: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}") from e


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
