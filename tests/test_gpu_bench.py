"""bench/memory_plan.py and bench/gpu_bench.py: the plan's counts, and the GPU bench's thin CPU slice."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import memory_plan  # noqa: E402


def test_parameter_counts_are_the_published_model_sizes():
    for name, billions in (("Qwen3-VL-4B", 4.44), ("Qwen3-VL-8B", 8.77)):
        total, vision, layer = memory_plan.parameters(memory_plan.ARCHS[name])
        assert total / 1e9 == pytest.approx(billions, abs=0.01)
        assert 0.3e9 < vision < 0.6e9 and layer < total / 36


def test_plan_counts_each_precision_and_sharding_as_documented():
    arch, GiB = memory_plan.ARCHS["Qwen3-VL-4B"], memory_plan.GiB
    total = memory_plan.parameters(arch)[0]
    parts = {m: memory_plan.plan(arch, master=m) for m in ("fp32", "stochastic", "bf16")}
    assert parts["fp32"]["optimiser"] == 12 * total and parts["fp32"]["gradients"] == 6 * total
    assert parts["stochastic"]["optimiser"] == 8 * total and parts["stochastic"]["gradients"] == 2 * total
    assert parts["bf16"]["optimiser"] == 4 * total
    sharded = memory_plan.plan(arch, ranks=8)
    assert sharded["optimiser"] == parts["fp32"]["optimiser"] / 8 and sharded["teacher"] == 2 * total
    assert memory_plan.plan(arch, checkpointing=False)["activations"] > 10 * parts["fp32"]["activations"]
    assert memory_plan.plan(arch, loss="full")["logits"] < parts["fp32"]["logits"] / 10
    # the table's verdicts: a 4B OPCD step with fp32 masters does not fit one 80 GB card; stochastic rounding does
    assert parts["fp32"]["peak"] > 80 * GiB > parts["stochastic"]["peak"]
    assert "| full, --master stochastic | 76 fits |" in memory_plan.table()


def test_gpu_bench_runs_a_thin_slice_on_cpu(capsys):
    import gpu_bench

    gpu_bench.main(["--arch", "Qwen3-VL-4B", "--layers", "1", "--vocab", "4096", "--narrow", "8", "--micro-batch", "1", "--seq-len", "32",
                    "--steps", "1", "--batch", "2", "--new-tokens", "4"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| LoRA") or line.startswith("| full")
            or line.startswith("| --loss")]
    assert len(rows) == 6
    for row in rows:
        cells = row.strip("|").split("|")[1:]
        assert all(cell.strip() == "n/a" or float(cell) >= 0 for cell in cells)
        assert "n/a" not in row.split("|")[2]  # the first measured number of every run is there
    assert "| 4 |" in out.split("### OPCD")[1]  # 4 response tokens: random weights never stop early
