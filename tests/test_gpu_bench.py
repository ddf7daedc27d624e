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


def test_the_honest_count_of_a_lora_step_of_the_4b_model():
    """4 N forward + input gradient over the matrices that run, 2 N weight gradient for the LoRA factors only,
    causal attention; counted here by hand from the published shapes (hidden 2560, 36 layers, 32 x 128 query
    heads, 8 x 128 key/value heads, MLP 9728, vocabulary 151,936)."""
    import torch
    import gpu_bench
    from mgsd import lora
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(memory_plan.config(memory_plan.ARCHS["Qwen3-VL-4B"]))
    lora.add_lora(model, 16, 32)
    h, q, kv, mlp, layers, vocab, seq = 2560, 4096, 1024, 9728, 36, 151936, 2048
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, mlp), (h, mlp), (mlp, h)]
    frozen = layers * sum(a * b for a, b in shapes)
    adapters = layers * sum(16 * (a + b) for a, b in shapes)
    head = h * vocab
    attention = 2 * seq * q * layers
    model_flops = 4 * (frozen + adapters + head) + 2 * adapters + 3 * attention
    assert gpu_bench.flops_per_token(model, seq, 0, False) == (model_flops, model_flops)
    recompute = 2 * (frozen + adapters) + attention  # every layer's forward again, and the chunked head's
    assert gpu_bench.flops_per_token(model, seq, 1, True) == (model_flops, model_flops + recompute + 2 * head)
    assert gpu_bench.flops_per_token(model, seq, 0.25, False)[1] == model_flops + recompute * 9 / 36
    assert model_flops / gpu_bench.old_count(model, seq) == pytest.approx(0.595, abs=0.01)  # 25.4 % was ~15 %


def test_the_prepared_gpu_check_runs_every_row_on_a_thin_slice_on_cpu(tmp_path):
    """bench/gpu_check.sh --thin: the GPU check's own commands; every row of every table has numbers."""
    import os
    import subprocess

    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--thin"], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(tmp_path), "PY": sys.executable}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tables = (tmp_path / "gpu_check.md").read_text()
    rows = [line for line in tables.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    assert len(rows) == 9 + 3 + 2  # SFT variants, OPCD runs, rollout caches
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")[1:]]
        assert all(c == "n/a" or float(c) >= 0 for c in cells), row  # n/a: MFU on a CPU, which has no listed peak
    opcd_rows = tables.split("### OPCD")[1].split("###")[0]
    assert opcd_rows.count("| 8 |") == 3  # every response is exactly --new-tokens 8 long
