"""Data-generation throughput: instances per second per task, end to end.

Each measurement is one `splits.make_split` call for one task over its default levels: generation with
BFS plans, distinct-state filtering, rendering, PNG writing and JSONL writing (planning + perception
rows by default), timed in this process once with one process and once with --workers. Besides
wall-clock rates it prints instances per CPU-second of all processes, which stays meaningful on a
machine shared with other jobs. Creating a file costs ~0.5-1 ms of kernel time on this VM's disk,
so --dir on a faster filesystem (e.g. /dev/shm) shows the rate without that cost.
For scale, the paper's generators measured on the 2-core CPU machine: 57 (FrozenLake), 388 (Maze)
and 174 (MiniBehaviour) instances/s.

    python bench/envs_bench.py                     # 300 instances per level, 1 and 2 processes
    python bench/envs_bench.py --per-level 1000 --workers 2 --image-size 128
"""
import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import envs  # noqa: E402
from mgsd import splits  # noqa: E402


def cpu_seconds():
    """User + system CPU time of this process and of its finished children (the workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(task, per_level, workers, kinds, image_size, split, root):
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        start, cpu_start = time.perf_counter(), cpu_seconds()
        out = splits.make_split(Path(tmp) / "data", split, per_level, tasks=[task], kinds=kinds, workers=workers,
                              image_size=image_size)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        images = len(list((out / "images").iterdir()))
    instances = per_level * len(envs.DEFAULT_LEVELS[task])
    return instances, images, seconds, cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-level", type=int, default=300, help="instances per (task, level)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the parallel measurement")
    parser.add_argument("--image-size", type=int, default=256, help="picture side in pixels")
    parser.add_argument("--kinds", default="planning,perception", help="comma-separated row kinds to write")
    parser.add_argument("--split", default="train", choices=tuple(splits.SPLITS), help="split whose seeds are used")
    parser.add_argument("--dir", default=".", help="where the temporary output goes (file creation cost varies by disk)")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    print(f"per level {args.per_level}, kinds {args.kinds}, image {args.image_size} px, split {args.split}, "
          f"output under {Path(args.dir).resolve()}")
    print("inst/s = instances / wall seconds; per CPU-s = instances / CPU seconds of all processes (load-independent)")
    print(f"| task | levels | instances | PNGs | 1 process inst/s | per CPU-s | {args.workers} workers inst/s | per CPU-s |")
    print("|---|---|---|---|---|---|---|---|")
    for task in envs.TASKS:
        n, images, one, one_cpu = measure(task, args.per_level, 1, kinds, args.image_size, args.split, args.dir)
        _, _, many, many_cpu = measure(task, args.per_level, args.workers, kinds, args.image_size, args.split, args.dir)
        levels = ",".join(map(str, envs.DEFAULT_LEVELS[task]))
        print(f"| {task} | {levels} | {n} | {images} | {n / one:.0f} ({one:.2f} s) | {n / one_cpu:.0f} "
              f"| {n / many:.0f} ({many:.2f} s) | {n / many_cpu:.0f} |")


if __name__ == "__main__":
    main()
