"""The run log of sft.py and opcd.py: OUT/log.jsonl (RunLog), and --report-to: what it holds, also sent to a
tracker people already watch (TensorBoard, Weights & Biases, SwanLab), with the run's settings. log.jsonl stays the record: a tracker is optional (none by default),
an uninstalled one is one line and exit 2 before any work, and a tracker that fails mid-run never stops training
(one warning, then the run goes on without it). Nothing here handles API keys: the trackers read their own
environment (WANDB_API_KEY, WANDB_MODE=offline, SWANLAB_MODE, ...).

    tracker = tracking.open_tracker("wandb", out, vars(args))   # None for "none"
    tracker.log({"loss": 0.3, "grad_norm": 1.2}, step=10)
    tracker.close()"""
import importlib.util
import json
import math
import os
from pathlib import Path

from mgsd import cli

CHOICES = ("none", "tensorboard", "wandb", "swanlab")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "swanlab": "swanlab"}


def check_installed(name):
    """One line and exit 2 when the tracker `name` is not installed (call before any work)."""
    if name != "none" and importlib.util.find_spec(PACKAGES[name]) is None:
        cli.fail(f"--report-to {name}: the package {PACKAGES[name]} is not installed "
                 f"(pip install -r requirements-track.txt, or --report-to none)")


class TensorBoard:
    """Event files under OUT/tb: every number as a scalar at its step, the settings as a text."""

    def __init__(self, out, config):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(out) / "tb"))
        self.writer.add_text("settings", "```\n" + json.dumps(config, indent=1, default=str) + "\n```")

    def log(self, metrics, step):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandB:
    """A run named after OUT in the project $WANDB_PROJECT (default mgsd); its files under OUT/wandb."""

    def __init__(self, out, config):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mgsd"), name=Path(out).name, dir=str(out),
                              config=config)

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


class SwanLab:
    """An experiment named after OUT in the project $SWANLAB_PROJECT (default mgsd); local files under OUT/swanlog."""

    def __init__(self, out, config):
        import swanlab

        self.swanlab = swanlab
        self.run = swanlab.init(project=os.environ.get("SWANLAB_PROJECT", "mgsd"), experiment_name=Path(out).name,
                                config=config, logdir=str(Path(out) / "swanlog"))

    def log(self, metrics, step):
        self.swanlab.log(metrics, step=step)

    def close(self):
        self.swanlab.finish()


TRACKERS = {"tensorboard": TensorBoard, "wandb": WandB, "swanlab": SwanLab}


class Tracker:
    """One tracker behind a guard: numbers only (bools as 0/1), and the first exception turns it off with a warning."""

    def __init__(self, name, out, config):
        self.name, self.backend = name, None
        self._guard("start", lambda: setattr(self, "backend", TRACKERS[name](out, config)))

    def _guard(self, what, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001  a tracker must never stop training
            cli.warn(f"--report-to {self.name}: {what} failed ({type(e).__name__}: {str(e)[:120]}); "
                     "the run goes on, log.jsonl holds everything")
            self.backend = None

    def log(self, metrics, step):
        numbers = {k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, (int, float))}
        if self.backend is not None and numbers:
            self._guard("logging", lambda: self.backend.log(numbers, step))

    def close(self):
        if self.backend is not None:
            self._guard("closing", self.backend.close)


def open_tracker(name, out, config):
    """The tracker for --report-to `name` (None for none), already started."""
    return None if name == "none" else Tracker(name, out, config)


def logged_step(line):
    """The step of a log.jsonl line; infinity for a line that is not one (a line torn by a kill is dropped)."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
    return step if isinstance(step, int) else math.inf


class RunLog:
    """OUT/log.jsonl, one JSON line of metrics a call, written by rank 0 only, and sent to the tracker of
    --report-to (below) with the run's `config`. Resuming from `resume_step` first drops the lines
    logged after it."""

    def __init__(self, out, resume_step=None, rank=0, report_to="none", config=None):
        self.file, self.tracker = None, None
        if rank != 0:
            return
        path = Path(out) / "log.jsonl"
        kept = [line for line in path.read_text(errors="replace").splitlines() if logged_step(line) <= resume_step] \
            if resume_step is not None and path.is_file() else []
        tmp = path.with_name(f".log.jsonl.tmp-{os.getpid()}")  # the kept lines replace the log whole or not at all
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
        self.file = open(path, "a")
        self.tracker = open_tracker(report_to, out, config or {})

    def __call__(self, metrics):
        if self.file is None:
            return
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.tracker is not None:
            self.tracker.log(metrics, metrics["step"])

    def close(self):
        for handle in (self.file, self.tracker):
            if handle is not None:
                handle.close()
