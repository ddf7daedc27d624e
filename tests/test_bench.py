"""Every bench/*.py runs as shipped, on a thin slice (tiny model, a few rows, a few tokens), so that an interface
change breaks a test and not a user; each prints its table, whose numbers are checked to be there and positive.
(bench/gpu_bench.py and gpu_check.sh: tests/test_gpu_bench.py. The peers' columns appear where TRL is installed.)"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(script, *args, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), *map(str, args)], cwd=tmp_path, text=True,
                          capture_output=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def numbers(line):
    return [float(x) for x in re.findall(r"-?\d+\.?\d*(?:e[+-]?\d+)?", line.split("|", 2)[-1] if "|" in line else line)]


def test_envs_bench(tmp_path):
    out = bench("envs_bench.py", "--per-level", 2, "--workers", 2, "--image-size", 128, "--dir", tmp_path, tmp_path=tmp_path)
    rows = [line for line in out.splitlines() if line.startswith("| ") and any(t in line for t in ("frozenlake", "maze"))]
    assert rows and all(numbers(r) and min(numbers(r)) > 0 for r in rows), out


def test_eval_bench(tmp_path):
    out = bench("eval_bench.py", "--per-level", 1, "--max-new-tokens", 4, "--limit", 4, "--backends", "oracle", "hf",
                tmp_path=tmp_path)
    assert "oracle" in out and "hf" in out, out


def test_opcd_bench(tmp_path):
    out = bench("opcd_bench.py", "--size", "tiny", "--batch-size", 2, "--micro-batch-size", 2, "--max-new-tokens", 4,
                "--steps", 1, "--backends", "hf,hf-student-prompt,hf-text,hf-before,vllm", "--peers", "distillation,sdft",
                tmp_path=tmp_path)
    speed, work = out.split("\nWork (")
    table = lambda text: {line.split("|")[1].strip(): numbers(line) for line in text.splitlines()
                          if line.startswith("| ours") or line.startswith("| TRL")}
    rows, work = table(speed), table(work)
    assert {"ours, hf", "ours, hf, teacher on the student's prompt", "ours, hf, text prompts",
            "ours, hf, before", "ours, vllm"} <= set(rows) and set(rows) == set(work), out
    for name, cells in rows.items():  # rollout, teacher, train, s/step, samples/s, ratio
        assert len(cells) == 6 and min(cells) > 0, out
    assert rows["ours, hf"][-1] == 1.0 and ("TRL is not installed" in out or len(rows) == 7), out
    # Work: rollout, teacher, train positions (k), teacher and train k positions/s; vLLM's rollout is not seen.
    hf, student_prompt = work["ours, hf"], work["ours, hf, teacher on the student's prompt"]
    assert len(hf) == 5 and min(hf) > 0 and len(work["ours, vllm"]) == 4, out
    assert student_prompt[0] == hf[0] and student_prompt[2] == hf[2], out  # the same rollouts and student forwards
    assert student_prompt[1] < hf[1], out  # the picture prompt is shorter than the privileged text
    for name in [n for n in work if n.startswith("TRL")]:
        assert len(work[name]) == 5 and min(work[name]) > 0, out


def test_sft_bench_prints_ours_beside_the_code_as_it_was(tmp_path):
    out = bench("sft_bench.py", "--rows", 8, "--batch-size", 8, "--micro-batch-size", 4, "--checkpoint-share", 0.5,
                tmp_path=tmp_path)
    row = next(line for line in out.splitlines() if line.startswith("| tokens/s"))
    assert "ours, 0.5 of the layers checkpointed" in out, out
    assert min(numbers(row)) > 0 and len(numbers(row)) >= 4, out  # before, ours, ours 0.5, ours/before (and TRL)


@pytest.mark.parametrize("args", [[], ["--check", "--check-size", "tiny", "--check-tokens", 8]])
def test_memory_plan(args, tmp_path):
    out = bench("memory_plan.py", *args, tmp_path=tmp_path)
    assert ("| full, --master stochastic | 76 fits |" in out) if not args else "measured growth" in out, out


def test_opcd_bench_refuses_an_unknown_row_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "opcd_bench.py"), "--backends", "hf,gpu"], cwd=tmp_path,
                          text=True, capture_output=True, timeout=120)
    assert proc.returncode == 2 and "--backends: unknown gpu" in proc.stderr.splitlines()[-1], proc.stderr
