"""Merge a LoRA adapter into its base model and save a plain Hugging Face checkpoint (docs/method.md §7).

Loads the base in float32, adds the adapter, computes the probe logits of base + adapter, folds each adapter
into its weight (W <- W + alpha/r B A, float32) and checks that the merged model reproduces them (exit 1
beyond --tolerance). The weights are cast to the base checkpoint's dtype and saved with the processor files,
atomically; the saved folder is reloaded and must hold exactly the merged weights. The probe batch: a chat
with a synthetic image and a text-only one (or --probe-data's first prompts), so both paths are checked.
--checkpoint turns sft.py's full fine-tuning OUT/checkpoint (e.g. of an interrupted run) into a model folder.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mgsd import cli, common, lora


def device(text):
    """--device: cpu, or cuda[:N] of a GPU that exists here."""
    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r}") from None
    if d.type not in ("cpu", "cuda") or (d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text!r}: merge.py runs on cpu or on one of this machine's "
                                         f"{torch.cuda.device_count()} GPU(s)")
    return str(d)


def parse_args(argv=None):
    p = cli.Parser(prog="merge.py", description="merge a LoRA adapter (or a full-FT checkpoint) into a plain HF model")
    p.add_argument("--base", required=True, help="base model folder or hub id (the one the adapter was trained on)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="PEFT-format LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    src.add_argument("--checkpoint", help="sft.py --full training checkpoint folder (trainable.safetensors)")
    p.add_argument("--out", required=True, help="output model folder (not the base's)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that already holds files")
    p.add_argument("--tolerance", type=cli.positive_float, default=1e-3, help="max allowed |logit diff| of merged vs base+adapter (fp32)")
    p.add_argument("--probe-data", default=None, help="optional split directory whose first rows' prompts form the probe batch")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device for the probe forward (cpu, cuda, cuda:N)")
    return p.parse_args(argv)


def probe_chats(probe_data=None, n=2):
    if probe_data:
        from mgsd import splits

        return [r["messages"][:-1] for r in splits.load_split(probe_data)[:n]]
    pixels = (np.add.outer(np.arange(256), np.arange(256)) % 256).astype(np.uint8)
    image = Image.fromarray(np.stack([pixels, pixels[::-1], pixels.T], -1))
    return [[{"role": "user", "content": [{"type": "text", "text": "Describe the map."}, {"type": "image", "image": image}]}],
            [{"role": "user", "content": [{"type": "text", "text": "Task: FrozenLake\nMap size: 4x4\nStart: (0,1)"}]}]]


@torch.no_grad()
def probe_logits(model, batch):
    batch = {k: v.to(model.device) for k, v in batch.items()}
    logits = model(**batch, use_cache=False).logits.float()
    return logits[batch["attention_mask"].bool()]  # padding positions are meaningless


def main(argv=None):
    args = parse_args(None if argv is None else [str(a) for a in argv])
    cli.check_out(args.out, overwrite=args.overwrite, inputs=[args.base, args.adapter, args.checkpoint, args.probe_data],
                  script="merge.py")
    try:
        source = Path(args.adapter or args.checkpoint)
        needed = ["adapter_config.json", "adapter_model.safetensors"] if args.adapter else ["trainable.safetensors"]
        if not all((source / name).is_file() for name in needed):  # fail before loading a large model
            raise FileNotFoundError(f"{source}: not {'a LoRA adapter' if args.adapter else 'an sft.py checkpoint'} "
                                    f"(need {' and '.join(needed)})")
        model, processor = common.load_model(args.base, args.device, dtype=torch.float32)
        from transformers import AutoConfig

        base_dtype = getattr(AutoConfig.from_pretrained(args.base), "dtype", None) or torch.float32  # as stored
        base_dtype = getattr(torch, base_dtype) if isinstance(base_dtype, str) else base_dtype
        batch = common.encode_prompts(processor, probe_chats(args.probe_data))
        if args.adapter:
            lora.load_adapter(model, args.adapter)
        else:
            from safetensors.torch import load_file

            try:
                weights, params = load_file(str(source / "trainable.safetensors")), dict(model.named_parameters())
            except Exception as e:  # a truncated or foreign file: safetensors raises its own error type
                raise ValueError(f"{source / 'trainable.safetensors'}: cannot read it ({type(e).__name__})") from None
            unknown = sorted(set(weights) - set(params))
            if unknown:
                raise ValueError(f"{args.checkpoint}: tensor {unknown[0]} is not a parameter of the base model "
                                 "(a LoRA checkpoint? use sft.py's adapter/ with --adapter)")
            wrong = sorted(n for n, t in weights.items() if t.shape != params[n].shape)
            if wrong:
                raise ValueError(f"{args.checkpoint}: {wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, the base's "
                                 f"is {tuple(params[wrong[0]].shape)} (a checkpoint of another model?)")
            cli.require_finite(weights, str(args.checkpoint))
            for name, tensor in weights.items():
                params[name].data.copy_(tensor)
    except (FileNotFoundError, ValueError) as e:
        cli.fail(str(e).splitlines()[0])

    reference = probe_logits(model, batch)  # base + adapter, unmerged, float32
    lora.merge_lora(model)
    diff = (probe_logits(model, batch) - reference).abs().max().item()
    print(f"merged vs base+adapter (float32): max |logit diff| = {diff:.3g} over {reference.shape[0]} positions")
    if not diff <= args.tolerance:  # a NaN difference (weights that overflow) fails too
        print(f"error: merged logits differ by {diff:.3g} > --tolerance {args.tolerance}; nothing written", file=sys.stderr)
        sys.exit(1)

    model.to(base_dtype)
    merged_state = model.state_dict()
    try:
        cli.require_finite(merged_state, f"refusing to write {args.out}")  # e.g. a bf16 base: overflow to inf
    except cli.NonFinite as e:
        cli.fail(str(e))
    with cli.atomic_dir(args.out) as tmp:
        common.write_model_files(model, processor, tmp)
        saved, _ = common.load_model(tmp, args.device, dtype=base_dtype)
        for name, tensor in saved.state_dict().items():  # the folder holds exactly the merged weights
            if not torch.equal(tensor, merged_state[name]):
                raise RuntimeError(f"saved tensor {name} differs from the merged weights")
        saved_diff = (probe_logits(saved, batch) - reference).abs().max().item()
    dtype_name = str(base_dtype).replace("torch.", "")
    print(f"wrote {args.out} ({dtype_name}); saved model vs float32 base+adapter: max |logit diff| = {saved_diff:.3g}")


if __name__ == "__main__":
    cli.interruptible(main, "nothing was written")
