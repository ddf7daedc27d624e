"""Benchmark: our SFT step (sft.py) against the code as it was before the real-size changes (`before`: the
LoRA as two products and an add, the [tokens, vocab] fp32 logits at once, HF's attention; bench/gpu_bench.py's
versions) and against TRL SFTTrainer + PEFT LoRA, same model/data/batch/LoRA. TRL's model runs HF's own SDPA
attention, as from_pretrained gives it; ours, on CPU, common.sdpa_shared_kv.

Both sides train one epoch over the same rows, the same --batch-size rows an optimiser step in the same order, in
micro-batches of --micro-batch-size rows (gradient accumulation: TRL's micro-batches are consecutive rows, ours the
step's rows grouped by length as sft.py groups them), LoRA r8 / alpha 16 / dropout 0 on the language model's
q/k/v/o/gate/up/down projections, the
same learning-rate schedule, float32 on CPU (bf16 autocast on GPU), and the same
gradient-checkpointing setting; the loss is on the answer tokens only on both sides (TRL:
prompt-completion rows, completion-only loss). Each side runs in its own process.
- tokens/s: non-padding tokens of the epoch (counted once, with our encoder) / training seconds;
- peak memory: GPU max_memory_allocated, or on CPU the peak growth of the resident set during
  training over its size just before (sampled every 5 ms), so import and model-loading costs
  of either library do not count.

TRL is not a project dependency: `pip install -r requirements-bench.txt` (trl) first; without it
the TRL column is left out.

    python bench/sft_bench.py                       # builds a tiny model and a small split in a temp dir
    python bench/sft_bench.py --model models/small --data data/train --batch-size 16 --micro-batch-size 4 --rows 128
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="tokens/s and peak memory: our SFT step vs TRL SFTTrainer + PEFT")
    p.add_argument("--model", default=None, help="model folder (default: build a tiny model in a temp dir)")
    p.add_argument("--data", default=None, help="split directory (default: a small perception + planning split)")
    p.add_argument("--rows", type=int, default=96, help="training rows (one epoch)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per optimiser step on both sides")
    p.add_argument("--micro-batch-size", type=int, default=4, help="rows per forward and backward on both sides")
    p.add_argument("--max-length", type=int, default=2048, help="maximum tokens per row")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing on both sides")
    p.add_argument("--checkpoint-share", type=float, default=1.0, help="below 1: one more column, ours checkpointing "
                   "that share of the decoder layers only (sft.py --checkpoint-share; TRL checkpoints every layer)")
    p.add_argument("--side", choices=["before", "ours", "ours-share", "trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


class PeakMemory:
    """Peak memory growth during a block: CUDA allocator peak, or sampled resident set size."""

    def __init__(self, device):
        self.device, self.peak, self.base = device, 0, 0

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = self.rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self.rss())
        self.growth = self.peak - self.base


def run_ours(args, rows, device):
    import torch
    from contextlib import nullcontext

    from mgsd import common, lora
    import sft

    model, processor = common.load_model(args.model, device)
    if args.side == "before":
        model.set_attn_implementation("sdpa")  # HF's attention, as before common.sdpa_shared_kv
    lora.add_lora(model, 8, 16, 0.0)
    if args.grad_checkpointing:
        common.enable_checkpointing(model, args.checkpoint_share if args.side == "ours-share" else 1.0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    steps = len(rows) // args.batch_size
    pad = processor.tokenizer.pad_token_id
    with PeakMemory(device) as mem:
        t0 = time.time()
        for step in range(steps):
            chunk = rows[step * args.batch_size:(step + 1) * args.batch_size]
            micro = sft.micro_batches([sft.encode_chat(processor, r["messages"], args.max_length) for r in chunk],
                                      args.micro_batch_size, pad)
            n_target = sum(len(b["target_positions"]) for b in micro)
            for g in optimizer.param_groups:
                g["lr"] = sft.lr_at(step, steps, 1e-4, 0.1)
            for batch in micro:
                with autocast:
                    loss = sft.sft_loss(model, {k: v.to(device) for k, v in batch.items()}) / n_target
                loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t0
    return seconds, mem.growth


def run_trl(args, rows, device):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from mgsd import common, lora

    model, processor = common.load_model(args.model, device)
    model.set_attn_implementation("sdpa")  # HF's own attention, as a TRL user's from_pretrained gives it

    def to_trl(row):  # prompt-completion form: TRL then puts the loss on the completion only
        prompt = [{"role": m["role"], "content": [{"type": c["type"], "text": c["text"]} if c["type"] == "text"
                                                  else {"type": "image"} for c in m["content"]]}
                  for m in row["messages"][:-1]]
        images = [common.load_image(c["image"]) for m in row["messages"] for c in m["content"] if c["type"] == "image"]
        return {"prompt": prompt, "completion": [row["messages"][-1]], "images": images}

    dataset = Dataset.from_list([to_trl(r) for r in rows])
    config = SFTConfig(output_dir=str(Path(args.result).parent / "trl-out"), per_device_train_batch_size=args.micro_batch_size,
                       gradient_accumulation_steps=args.batch_size // args.micro_batch_size, num_train_epochs=1,
                       learning_rate=1e-4,
                       lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0, max_grad_norm=1.0,
                       max_length=args.max_length, gradient_checkpointing=args.grad_checkpointing,
                       gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=device.type == "cuda",
                       use_cpu=device.type == "cpu", report_to="none", save_strategy="no", logging_steps=10 ** 6,
                       dataloader_drop_last=True, remove_unused_columns=False, seed=0,
                       train_sampling_strategy="sequential")  # the same batches, in the same order, as ours
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora.lora_target_regex(), bias="none")
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor, peft_config=lora)
    with PeakMemory(device) as mem:
        t0 = time.time()
        trainer.train()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.time() - t0
    return seconds, mem.growth


def child(args):
    import torch

    from mgsd import splits

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = [r for r in splits.load_split(args.data) if r.get("messages")][:args.rows]
    if args.side == "before":  # the same loop on the code as it was
        from mgsd import lora
        import sft

        sys.path.insert(0, str(ROOT / "bench"))
        import gpu_bench

        lora.LoRALinear.forward, sft.sft_loss = gpu_bench.lora_forward_before, gpu_bench.sft_loss_before
    seconds, growth = (run_trl if args.side == "trl" else run_ours)(args, rows, device)
    Path(args.result).write_text(json.dumps({"seconds": seconds, "peak_bytes": growth, "device": str(device)}))


def main():
    args = parse_args()
    if args.side:
        return child(args)
    tmp = Path(tempfile.mkdtemp(prefix="sft_bench_"))
    try:
        compare(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare(args, tmp):
    from mgsd import common
    import sft
    from mgsd import splits, tiny

    if args.model is None:
        args.model = str(tiny.build_model(tmp / "model", size="tiny"))
    if args.data is None:
        args.data = str(splits.make_split(tmp / "data", "train", max(1, args.rows // 24 + 1), kinds=("perception", "planning"),
                                        image_size=128))
    rows = [r for r in splits.load_split(args.data) if r.get("messages")][:args.rows]
    _, processor = common.load_model(args.model)
    if args.batch_size % args.micro_batch_size:
        sys.exit(f"error: --batch-size {args.batch_size} must be a multiple of --micro-batch-size {args.micro_batch_size}")
    usable = len(rows) // args.batch_size * args.batch_size
    tokens = sum(len(sft.encode_chat(processor, r["messages"], args.max_length)["input_ids"]) for r in rows[:usable])
    results, sides = {}, ["before", "ours"] + (["ours-share"] if args.checkpoint_share < 1 and args.grad_checkpointing else [])
    try:
        import trl  # noqa: F401
        sides.append("trl")
    except ImportError:
        print("TRL is not installed (`pip install -r requirements-bench.txt`): no TRL column")
    for side in sides:
        out = tmp / f"{side}.json"
        cmd = [sys.executable, __file__, "--side", side, "--result", str(out), "--model", args.model, "--data", args.data,
               "--rows", str(usable), "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size),
               "--max-length", str(args.max_length), "--checkpoint-share", str(args.checkpoint_share),
               "--grad-checkpointing" if args.grad_checkpointing else "--no-grad-checkpointing"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"error: the {side} run failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(out.read_text())
    ours = results["ours"]
    print(f"SFT step, LoRA r8, {usable} rows x 1 epoch, batch {args.batch_size}, micro-batch {args.micro_batch_size}, "
          f"{tokens} tokens, "
          f"grad checkpointing {'on' if args.grad_checkpointing else 'off'}, device {ours['device']}")
    names = {"before": "before", "ours": "ours", "ours-share": f"ours, {args.checkpoint_share:g} of the layers checkpointed",
             "trl": "TRL+PEFT"}
    short = {"before": "before", "ours": "ours", "ours-share": f"ours {args.checkpoint_share:g}", "trl": "TRL"}
    pairs = [(a, b) for a, b in (("ours", "before"), ("ours", "trl"), ("ours-share", "trl")) if a in results and b in results]
    print("| | " + " | ".join(names[side] for side in results) + " | "
          + " | ".join(f"{short[a]}/{short[b]}" for a, b in pairs) + " |")
    print("|---|" + "---|" * (len(results) + len(pairs)))
    for label, value in (("tokens/s", lambda r: tokens / r["seconds"]), ("peak memory growth MiB", lambda r: r["peak_bytes"] / 2**20)):
        cells = [value(r) for r in results.values()]
        ratios = [value(results[a]) / max(value(results[b]), 1e-9) for a, b in pairs]
        print(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")

if __name__ == "__main__":
    main()
