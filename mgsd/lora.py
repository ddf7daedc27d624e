"""A hand-rolled LoRA, y = W x + (alpha / r) * B(A(dropout(x))) with B = 0 at the start and A
Kaiming-uniform, on the language model's attention and MLP linears; saved and loaded in PEFT's
adapter format (adapter_config.json + adapter_model.safetensors), so `peft` reads our adapters.
The adapters are fp32 whatever the frozen W is (bf16 on GPU): they are what the optimiser moves."""
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mgsd import cli


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank=8, alpha=16, dropout=0.0):
        super().__init__()
        self.base_layer = base  # PEFT's attribute name, so state-dict names line up
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self):  # some HF code reads module.weight.dtype
        return self.base_layer.weight

    def forward(self, x):
        """W x, then scaling * B (A x) added in the same matrix product (addmm: the low-rank term never
        exists as an output-sized tensor of its own). The adapters are cast to the input's dtype (a
        no-op in fp32; under bf16 the gradient still reaches the fp32 adapters)."""
        y = self.base_layer(x)
        low = F.linear(self.dropout(x), self.lora_A.weight.to(x.dtype))
        out = torch.addmm(y.reshape(-1, y.shape[-1]), low.reshape(-1, self.rank), self.lora_B.weight.to(x.dtype).t(),
                          alpha=self.scaling)
        return out.view(y.shape)

    def delta(self):
        """What merging adds to W: scaling * B @ A, in float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merged(self):
        """The plain nn.Linear with W + delta()."""
        base = self.base_layer
        base.weight.data = (base.weight.data.float() + self.delta()).to(base.weight.dtype)
        return base


def lora_target_regex(targets=LORA_TARGETS):
    """PEFT target_modules regex: the named linears of the language model only."""
    return r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(targets) + r")"


def add_lora(model, rank=8, alpha=16, dropout=0.0, targets=LORA_TARGETS):
    """Freeze every weight, wrap the language model's target linears in LoRALinear (trainable).
    Returns the list of wrapped module names."""
    pattern = re.compile(lora_target_regex(targets))
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.fullmatch(n)]
    if not names:
        raise ValueError(f"add_lora: no module matches {pattern.pattern}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    model._lora_config = dict(rank=rank, alpha=alpha, dropout=dropout, targets=list(targets))
    return names


def merge_lora(model):
    """Replace every LoRALinear by its merged nn.Linear (in place). Returns the model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, m.merged())
    return model


def adapter_state_dict(model):
    """LoRA weights under PEFT's key names: base_model.model.<module path>.lora_A.weight."""
    sd = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
            sd[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()
    return sd


def base_fingerprint(model):
    """sha256 of the input embeddings as float32: the base an adapter was trained on (LoRA never trains them), the
    same whatever dtype the base was loaded in. Two bases of one shape but other weights differ here."""
    import hashlib

    weights = model.get_input_embeddings().weight.detach().float().cpu().contiguous()
    return hashlib.sha256(weights.numpy().tobytes()).hexdigest()


def save_adapter(model, out_dir, base_model_path):
    """Save the LoRA adapter in PEFT format (adapter_config.json + adapter_model.safetensors), with the fingerprint
    of its base in the weights file's metadata (which PEFT does not read)."""
    from safetensors.torch import save_file

    cfg = model._lora_config
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base_model_path),
        "r": cfg["rank"], "lora_alpha": cfg["alpha"], "lora_dropout": cfg["dropout"],
        "target_modules": lora_target_regex(cfg["targets"]), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "inference_mode": True,
    }
    weights = {k: v.cpu() for k, v in adapter_state_dict(model).items()}
    cli.require_finite(weights, f"refusing to write {out_dir}")
    with cli.atomic_dir(out_dir) as tmp, cli.write_failure(out_dir):
        save_file(weights, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt", "mgsd_base_fingerprint": base_fingerprint(model)})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def load_adapter(model, adapter_dir):
    """Add LoRA layers as described by adapter_config.json and load their weights; an adapter saved here with the
    fingerprint of another base (same shapes, other weights) is refused."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(f"{adapter_dir}: not a LoRA adapter (need adapter_config.json and adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text())
        rank, alpha, dropout = cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0)
        if not (isinstance(rank, int) and 0 < rank <= 4096 and isinstance(alpha, (int, float)) and 0 < alpha < 1e6
                and isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ValueError(f"r {rank!r}, lora_alpha {alpha!r}, lora_dropout {dropout!r}")
        targets = cfg.get("target_modules") or LORA_TARGETS
        if isinstance(targets, str):  # our regex: recover the names between the last parentheses
            targets = targets.rsplit("(", 1)[1].rstrip(")").split("|")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not a LoRA adapter config ({type(e).__name__}: {str(e)[:80]})") from None
    try:
        from safetensors import safe_open

        with safe_open(str(weights_file), "pt") as f:
            saved_base = (f.metadata() or {}).get("mgsd_base_fingerprint")
    except Exception as e:  # a truncated or foreign file: safetensors raises its own error type
        raise ValueError(f"{weights_file}: cannot read the adapter's weights ({type(e).__name__})") from None
    if saved_base is not None and saved_base != base_fingerprint(model):
        raise ValueError(f"{adapter_dir} was trained on another base model ({cfg.get('base_model_name_or_path')}); "
                         "its weights differ from this one's")
    add_lora(model, rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    try:
        weights = load_file(str(weights_file))
    except Exception as e:  # a truncated or foreign file: safetensors raises its own error type
        raise ValueError(f"{weights_file}: cannot read the adapter's weights ({type(e).__name__})") from None
    expected = adapter_state_dict(model)
    missing = set(expected) - set(weights)
    if missing:
        raise ValueError(f"{adapter_dir}: adapter lacks {len(missing)} tensors, e.g. {sorted(missing)[0]}")
    wrong = sorted(k for k in expected if weights[k].shape != expected[k].shape)
    if wrong:
        raise ValueError(f"{adapter_dir}: {wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, this base and rank "
                         f"{rank} need {tuple(expected[wrong[0]].shape)}")
    cli.require_finite(weights, str(adapter_dir))
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            m.lora_A.weight.data.copy_(weights[f"base_model.model.{name}.lora_A.weight"])
            m.lora_B.weight.data.copy_(weights[f"base_model.model.{name}.lora_B.weight"])
    return model
