"""Speed and memory of the training steps at real size: random-weight Qwen3-VL-4B / 8B on one GPU.

No download: the architectures are written out in bench/memory_plan.py (their published configs) and
the weights are random, which costs the same FLOPs and bytes as the trained ones. The tokenizer and
image processor are the project's tiny ones (their ids are valid in the 151,936-token vocabulary);
pictures are 256 px, as for real models.

  sft   one sft.py step (sft.sft_loss, the same trainable set, checkpointing, bf16 autocast on GPU) on
        --micro-batch x --seq-len random tokens, LoRA (rank 16) and full: tokens/s, peak memory and
        MFU = (6 N + 12 layers x seq x q_dim) x tokens/s / the card's dense bf16 peak (PaLM's count)
  opcd  one opcd.opcd_step (HF generate rollout of --batch x --new-tokens, frozen bf16 teacher of the
        same size, student forward/backward, the optimiser step): seconds per phase and peak memory,
        for --loss sampled / full and checkpointing on / off

On CPU it runs a thin slice (--layers 1 --vocab 4096 --narrow 8, small batches) so that a test keeps it working.

    python bench/gpu_bench.py --arch Qwen3-VL-4B                      # GPU: the full table
    python bench/gpu_bench.py --arch Qwen3-VL-4B --layers 1 --vocab 4096 --narrow 8 --micro-batch 1 \\
        --seq-len 64 --batch 2 --new-tokens 8                         # CPU smoke run
"""
import argparse
import contextlib
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import common  # noqa: E402
import lora  # noqa: E402
import memory_plan  # noqa: E402
import opcd  # noqa: E402
import optim  # noqa: E402
import sft  # noqa: E402
import splits  # noqa: E402
import tiny  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s of the SXM cards


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: the process's peak RSS


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def random_model(cfg, device, dtype, processor):
    """A random Qwen3-VL of `cfg` whose special-token ids are those of the tiny processor."""
    from transformers import Qwen3VLForConditionalGeneration

    tok = processor.tokenizer
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(cfg, key, tok.convert_tokens_to_ids(token))
    cfg.text_config.pad_token_id = tok.pad_token_id
    cfg.text_config.eos_token_id = tok.eos_token_id
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(cfg).to(dtype)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    return model


def bench_sft(cfg, processor, args, device, with_lora):
    model = random_model(cfg, device, torch.float32, processor)  # sft.py: fp32 weights, bf16 autocast on GPU
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith("model.visual."))
    if with_lora:
        lora.add_lora(model, 16, 32, 0.0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (args.micro_batch, args.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": torch.zeros_like(ids),
             "labels": ids}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    reset_peak(device)
    times = []
    for _ in range(args.steps + 1):  # the first step warms up (allocator, kernels) and is not timed
        start = time.time()
        with autocast:
            loss = sft.sft_loss(model, batch) / ids.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.time() - start)
    seconds = sum(times[1:]) / args.steps
    tokens_per_s = ids.numel() / seconds
    n = sum(p.numel() for p in model.parameters())
    t = cfg.text_config
    flops_per_token = 6 * n + 12 * t.num_hidden_layers * args.seq_len * t.num_attention_heads * t.head_dim
    return {"s/step": seconds, "tokens/s": tokens_per_s, "peak GiB": peak_memory(device),
            "MFU %": 100 * flops_per_token * tokens_per_s / args.peak_flops if args.peak_flops else None}


class TimedAdamW(optim.MasterAdamW):
    """MasterAdamW that adds the time of each step to `seconds` (the bench's only addition)."""
    seconds = 0.0

    def step(self, max_grad_norm):
        start = time.time()
        norm = super().step(max_grad_norm)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        TimedAdamW.seconds += time.time() - start
        return norm


def bench_opcd(cfg, processor, rows, args, device, loss, checkpointing):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(cfg, device, dtype, processor)
    teacher = random_model(cfg, device, dtype, processor).requires_grad_(False).eval()
    argv = ["--model", "-", "--teacher", "-", "--data", "-", "--out", "-", "--rollout", "hf", "--loss", loss,
            "--batch-size", args.batch, "--micro-batch-size", args.micro_batch, "--max-new-tokens", args.new_tokens,
            "--master", args.master, "--grad-checkpointing" if checkpointing else "--no-grad-checkpointing"]
    run_args = opcd.parse_args(list(map(str, argv)))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = TimedAdamW(model.parameters(), 1e-6, (0.9, 0.999), 0.01, args.master)
    reset_peak(device)
    TimedAdamW.seconds = 0.0
    log = opcd.opcd_step(run_args, 0, rows[:args.batch], model, teacher, None, processor, opt, 1, device)
    return {"rollout s": log["seconds_rollout"], "teacher s": log["seconds_teacher"],
            "student fwd/bwd s": log["seconds_train"] - TimedAdamW.seconds, "optimiser s": TimedAdamW.seconds,
            "response tokens": log["response_tokens"], "peak GiB": peak_memory(device)}


def markdown(title, results):
    keys = list(next(iter(results.values())))
    lines = [f"### {title}", "", "| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join("n/a" if r[k] is None else f"{r[k]:.3g}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="Qwen3-VL-4B", choices=sorted(memory_plan.ARCHS), help="architecture")
    p.add_argument("--layers", type=int, default=None, help="cut to this many decoder layers / vision blocks")
    p.add_argument("--vocab", type=int, default=None, help="cut the vocabulary (CPU smoke runs)")
    p.add_argument("--narrow", type=int, default=1, help="divide widths and head counts by this (CPU smoke runs)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward pass")
    p.add_argument("--seq-len", type=int, default=2048, help="SFT sequence length")
    p.add_argument("--steps", type=int, default=3, help="timed SFT steps (after one warm-up step)")
    p.add_argument("--batch", type=int, default=32, help="OPCD prompts per step")
    p.add_argument("--new-tokens", type=int, default=512, help="OPCD rollout length (random weights never stop early)")
    p.add_argument("--master", default="stochastic", choices=["fp32", "stochastic", "bf16"], help="OPCD --master")
    p.add_argument("--losses", nargs="+", default=["sampled", "full"], choices=["sampled", "full"],
                   help="OPCD --loss values to run")
    p.add_argument("--checkpointing", nargs="+", default=["on", "off"], choices=["on", "off"],
                   help="OPCD gradient checkpointing settings to run")
    p.add_argument("--only", nargs="+", default=["sft", "opcd"], choices=["sft", "opcd"], help="which benchmarks")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    args.peak_flops = next((v for k, v in PEAK_BF16.items() if k in card), None)
    cfg = memory_plan.config(memory_plan.ARCHS[args.arch], args.layers, args.vocab, args.narrow)
    with tempfile.TemporaryDirectory() as tmp:
        processor = common.load_model(tiny.build_model(Path(tmp) / "tok", "tiny", image_size=256))[1]
        per_level = -(-args.batch // 3)
        rows = splits.load_split(splits.make_split(Path(tmp) / "data", "train", per_level, tasks=["frozenlake", "maze", "minibehaviour"],
                                               levels={"frozenlake": [4], "maze": [4], "minibehaviour": [5]},
                                               kinds=("planning",), image_size=256), kinds=["planning"])
        print(f"{args.arch}{' (a thin slice)' if args.layers or args.vocab or args.narrow > 1 else ''} on {card}, torch "
              f"{torch.__version__}", flush=True)
        tables = []
        if "sft" in args.only:
            results = {}
            for name, with_lora in (("LoRA r16", True), ("full", False)):
                try:
                    results[name] = bench_sft(cfg, processor, args, device, with_lora)
                except torch.OutOfMemoryError:
                    results[name] = {k: None for k in ("s/step", "tokens/s", "peak GiB", "MFU %")}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            tables.append(markdown(f"SFT step: micro-batch {args.micro_batch} x {args.seq_len} tokens, checkpointing on",
                                   results))
        if "opcd" in args.only:
            results = {}
            for loss in args.losses:
                for checkpointing in (c == "on" for c in args.checkpointing):
                    name = f"--loss {loss}, checkpointing {'on' if checkpointing else 'off'}"
                    try:
                        results[name] = bench_opcd(cfg, processor, rows, args, device, loss, checkpointing)
                    except torch.OutOfMemoryError:
                        results[name] = {k: None for k in ("rollout s", "teacher s", "student fwd/bwd s",
                                                           "optimiser s", "response tokens", "peak GiB")}
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            tables.append(markdown(f"OPCD step: {args.batch} prompts x {args.new_tokens} new tokens, micro-batch "
                                   f"{args.micro_batch}, --master {args.master}, student + frozen teacher", results))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
