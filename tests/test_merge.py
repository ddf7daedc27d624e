"""merge.py: adapter + base -> plain HF model, verified; full-FT checkpoint -> plain model."""
import os
import subprocess
import sys
from pathlib import Path

import torch

import merge
from mgsd import common, lora

ROOT = Path(__file__).resolve().parents[1]


def _adapter(tiny_model, out, scale=0.05):
    model, _ = common.load_model(tiny_model)
    lora.add_lora(model, rank=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, lora.LoRALinear):
            m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * scale
    lora.save_adapter(model, out, tiny_model)
    return model


def _merge(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "merge.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_merged_checkpoint_reproduces_base_plus_adapter(tiny_model, tmp_path, capsys):
    unmerged = _adapter(tiny_model, tmp_path / "adapter")
    merge.main(["--base", tiny_model, "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged"])
    assert "max |logit diff|" in capsys.readouterr().out
    merged, processor = common.load_model(tmp_path / "merged")  # a plain folder: loads without our LoRA code
    assert not any(isinstance(m, lora.LoRALinear) for m in merged.modules())
    assert (tmp_path / "merged" / "video_preprocessor_config.json").is_file()
    batch = common.encode_prompts(processor, merge.probe_chats())
    torch.testing.assert_close(merge.probe_logits(merged, batch), merge.probe_logits(unmerged, batch), atol=1e-5, rtol=1e-5)
    base, _ = common.load_model(tiny_model)
    assert (merge.probe_logits(base, batch) - merge.probe_logits(merged, batch)).abs().max() > 1e-3


def test_merge_saves_in_the_base_dtype(tiny_model, tmp_path):
    base, processor = common.load_model(tiny_model)
    common.save_model(base.to(torch.bfloat16), processor, tmp_path / "base16")
    _adapter(tmp_path / "base16", tmp_path / "adapter")
    merge.main(["--base", tmp_path / "base16", "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged"])
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}


def test_merge_exits_nonzero_beyond_tolerance_and_writes_nothing(tiny_model, tmp_path):
    _adapter(tiny_model, tmp_path / "adapter")
    result = _merge("--base", tiny_model, "--adapter", tmp_path / "adapter", "--out", tmp_path / "merged",
                    "--tolerance", "1e-12")  # below fp32 rounding of the merged weights
    assert result.returncode == 1 and "error:" in result.stderr
    assert not (tmp_path / "merged").exists()


def test_merge_rejects_a_missing_adapter(tiny_model, tmp_path):
    result = _merge("--base", tiny_model, "--adapter", tmp_path / "nothing", "--out", tmp_path / "merged")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in result.stderr and not (tmp_path / "merged").exists()


def test_full_checkpoint_becomes_a_plain_model(tiny_model, make_data, tmp_path):
    import sft

    data = make_data("train", 4, tasks=["frozenlake", "maze"], levels=None, kinds=("perception", "planning"))
    out = tmp_path / "run"
    sft.main(["--model", tiny_model, "--data", data, "--out", out, "--full", "--batch-size", 4,
              "--micro-batch-size", 4, "--max-steps", 1, "--lr", 1e-2])
    merge.main(["--base", tiny_model, "--checkpoint", out / "checkpoint", "--out", tmp_path / "plain"])
    plain, _ = common.load_model(tmp_path / "plain")
    trained, _ = common.load_model(out / "model")  # what sft.py itself saved at the end
    for (n, a), (_, b) in zip(plain.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(a, b), n
