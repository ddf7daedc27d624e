"""What fits on one GPU: the predicted peak memory of an SFT step and an OPCD step, from the config.

The plan counts, per device, in bytes:
  weights      2 P (bf16; CPU runs use fp32: 4 P); under --fsdp the student's share is 1/N
  gradients    2 T on the model (T = trainable parameters), + 4 T fp32 copies under --master fp32
  optimiser    --master fp32: 4 T masters + 8 T Adam moments; stochastic: 8 T; bf16: 4 T (bf16 moments)
  teacher      2 P, whole on every rank (OPCD; 0 with --teacher live or a served teacher, --teacher-url)
  activations  per micro-batch of L = micro-batch x sequence tokens, per decoder layer: without
               checkpointing 2 L (4 h + 2 q + 2 kv + 3 i) bytes (norm outputs, q/k/v, attention output,
               residual, SwiGLU gate/up/product; flash/SDPA attention keeps no L x L scores); with
               checkpointing 2 L h per layer (the saved layer inputs) plus one layer's full set
  logits       --loss sampled: the response positions' logits, 10 bytes each (bf16 logits, fp32
               log-softmax and its gradient) x micro-batch x response x vocab; --loss full / topk: the KL
               chunk, 24 bytes x --kl-chunk x vocab (both models' fp32 logits, softmaxes, gradients; topk
               holds the teacher's K a position only, so this over-counts it)
  vLLM         --vllm-gpu-memory x the card while it samples; released during training by sleep
               mode (common.llm_sleep), so the peak is max(rollout phase, training phase)
  overhead     2 GiB (CUDA context, allocator slack)
Vision activations (64 merged tokens a 256-px picture) are left out; they are small next to 2,048-token
responses. The check against a measurement on this machine: `python bench/memory_plan.py --check`
runs one real OPCD step of a CPU model (fp32, HF rollout) and compares its peak RSS growth with the plan.

    python bench/memory_plan.py            # the table for Qwen3-VL-4B / 8B on one 80 GB card
    python bench/memory_plan.py --check    # plan vs measured peak on CPU
"""
import argparse
import functools
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30

# Qwen3-VL dense models, as in their published config.json: text (hidden, layers, q heads, kv heads, head_dim,
# mlp, vocab, tied embeddings); vision (hidden, depth, heads, mlp, out, deepstack layers).
ARCHS = {"Qwen3-VL-4B": dict(text=(2560, 36, 32, 8, 128, 9728, 151936, True), vision=(1024, 24, 16, 4096, (5, 11, 17))),
         "Qwen3-VL-8B": dict(text=(4096, 36, 32, 8, 128, 12288, 151936, False), vision=(1152, 27, 16, 4304, (8, 16, 24)))}


def config(arch, layers=None, vocab=None, narrow=1):
    """A transformers Qwen3VLConfig of `arch`; for the thin slices that CPU tests run, optionally cut to
    `layers` decoder layers and vision blocks, a smaller vocabulary, and widths / heads divided by `narrow`."""
    from transformers import Qwen3VLConfig

    h, n, q, kv, hd, i, v, tied = arch["text"]
    vh, depth, vheads, vi, deepstack = arch["vision"]
    n, depth = (layers, layers) if layers else (n, depth)
    h, q, kv, i, vh, vheads, vi = (x // narrow for x in (h, q, kv, i, vh, vheads, vi))
    return Qwen3VLConfig(
        text_config=dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=q, num_key_value_heads=kv, head_dim=hd,
                         intermediate_size=i, vocab_size=vocab or v, tie_word_embeddings=tied,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[24, 20, 20],
                                              mrope_interleaved=True)),
        vision_config=dict(hidden_size=vh, depth=depth, num_heads=vheads, intermediate_size=vi, out_hidden_size=h,
                           deepstack_visual_indexes=[d for d in deepstack if d < depth] or [0]),
        tie_word_embeddings=tied)


def parameters(arch):
    """(total, vision tower with its mergers, one decoder layer), counted on a weightless (meta) model."""
    return _count(arch["text"], arch["vision"])


@functools.cache
def _count(text, vision):
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config(dict(text=text, vision=vision)))
    count = lambda m: sum(p.numel() for p in m.parameters())
    return count(model), count(model.model.visual), count(model.model.language_model.layers[0])


def plan(arch, stage="opcd", trainable="full", lora_rank=16, master="fp32", ranks=1, micro_batch=4, prompt=512,
         response=2048, checkpointing=True, loss="sampled", kl_chunk=256, vllm_share=0.3, card=80 * GiB,
         weight_bytes=2, teacher=True):
    """{component: bytes} and "peak" for one device."""
    h, layers, q, kv, hd, i, vocab, _ = arch["text"]
    total, vision, layer = parameters(arch)
    trained = {"full": total, "freeze-vision": total - vision,  # LoRA on every linear of the decoder layers
               "lora": layers * lora_rank * (2 * h + hd * (q + 2 * kv) + q * hd + 2 * h + 3 * (h + i))}[trainable]
    shard = ranks if ranks > 1 else 1
    fp32_model = weight_bytes == 4
    optim = {"fp32": 12 if not fp32_model else 8, "stochastic": 8, "bf16": 4 if not fp32_model else 8}[master]
    grad = weight_bytes + (4 if master == "fp32" and not fp32_model else 0)
    tokens = micro_batch * (prompt + response)
    full_layer = 2 * tokens * (4 * h + 2 * q * hd + 2 * kv * hd + 3 * i)
    acts = layers * 2 * tokens * h + full_layer if checkpointing else layers * full_layer
    logits = (10 * micro_batch * response * vocab if loss == "sampled" else 24 * kl_chunk * vocab) if stage == "opcd" \
        else 10 * micro_batch * (prompt + response) * vocab
    parts = {"weights": weight_bytes * total / shard if trainable != "lora" else weight_bytes * total,
             "gradients": grad * trained / shard, "optimiser": optim * trained / shard,
             "teacher": weight_bytes * total if stage == "opcd" and teacher else 0,
             "activations": acts, "logits": logits,
             "vllm": vllm_share * card if stage == "opcd" else 0, "overhead": 2 * GiB}
    resident = parts["weights"] + parts["optimiser"] + parts["teacher"] + parts["overhead"]
    training = resident + parts["gradients"] + parts["activations"] + parts["logits"]
    parts["peak"] = max(training, resident + parts["vllm"])
    return parts


CONFIGS = [("full fine-tuning, --master fp32", dict()),
           ("full, --master stochastic", dict(master="stochastic")),
           ("full, --master bf16 (the reference)", dict(master="bf16")),
           ("--freeze-vision, --master stochastic", dict(trainable="freeze-vision", master="stochastic")),
           ("--lora-rank 16", dict(trainable="lora")),
           ("--fsdp over 8 ranks, --master fp32", dict(ranks=8)),
           ("full, --master stochastic, no checkpointing", dict(master="stochastic", checkpointing=False)),
           ("full, --master stochastic, --loss full", dict(master="stochastic", loss="full")),
           ("full, --master stochastic, teacher served elsewhere (--teacher-url)", dict(master="stochastic", teacher=False)),
           ("the same, --loss topk", dict(master="stochastic", teacher=False, loss="topk")),
           ("full, --master fp32, teacher served elsewhere", dict(teacher=False))]


def table(micro_batch=4, card=80 * GiB):
    lines = [f"Predicted peak per GPU, OPCD step (student + frozen bf16 teacher, micro-batch {micro_batch} x "
             f"(512 + 2,048) tokens, checkpointing on, vLLM 0.3 of the card asleep while training):", "",
             "| config | " + " | ".join(f"{name} (GiB)" for name in ARCHS) + " |", "|---|" + "---|" * len(ARCHS)]
    for label, kw in CONFIGS:
        cells = []
        for arch in ARCHS.values():
            peak = plan(arch, micro_batch=micro_batch, card=card, **kw)["peak"] / GiB
            cells.append(f"{peak:.0f} {'fits' if peak <= card / GiB else 'no'}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check(size="medium", new_tokens=256):
    """One OPCD step of a tiny model (`medium` by default) on CPU (fp32, HF rollout, sampled loss): peak RSS growth
    over a process that imports the same code and loads the processor only, against the plan."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        py = sys.executable
        run = lambda *a: subprocess.run([py, *map(str, a)], cwd=ROOT, check=True, capture_output=True, text=True)
        run("-m", "mgsd.tiny", "model", "--out", tmp / "m", "--size", size, "--image-size", 128)
        run("envs.py", "data", "--out", tmp / "d", "--split", "train", "--per-level", 4, "--kinds", "planning",
            "--tasks", "maze", "--levels", "maze=3", "--image-size", 128)
        probe = ("import resource, sys, opcd; from mgsd import common; from transformers import AutoProcessor; "
                 "AutoProcessor.from_pretrained(sys.argv[1]); "
                 "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        base_kib = int(run("-c", probe, tmp / "m").stdout.split()[-1])
        step = subprocess.run([py, *map(str, ["opcd.py", "--model", tmp / "m", "--teacher", tmp / "m", "--data", tmp / "d",
                               "--out", tmp / "run", "--rollout", "hf", "--batch-size", 4, "--micro-batch-size", 4,
                               "--max-new-tokens", new_tokens, "--max-steps", 1, "--lr", 1e-6, "--temperature", 1.0,
                               "--no-grad-checkpointing"])], cwd=ROOT, capture_output=True, text=True)
        assert step.returncode == 0, step.stderr[-2000:]
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        log = json.loads((tmp / "run" / "log.jsonl").read_text().splitlines()[-1])
        cfg = json.loads((tmp / "m" / "config.json").read_text())
    t, v = cfg["text_config"], cfg["vision_config"]
    arch = dict(text=(t["hidden_size"], t["num_hidden_layers"], t["num_attention_heads"], t["num_key_value_heads"],
                      t["head_dim"], t["intermediate_size"], t["vocab_size"], False),
                vision=(v["hidden_size"], v["depth"], v["num_heads"], v["intermediate_size"],
                        tuple(v["deepstack_visual_indexes"])))
    response = round(log["response_tokens"])
    parts = plan(arch, weight_bytes=4, master="fp32", micro_batch=4, prompt=300, response=response,
                 checkpointing=False, vllm_share=0, card=0)
    parts["overhead"] = 0
    predicted = sum(v for k, v in parts.items() if k not in ("peak", "vllm"))
    measured = (peak_kib - base_kib) * 1024
    print(f"{size} tiny model ({parameters(arch)[0] / 1e6:.1f}M parameters), one OPCD step on CPU, "
          f"4 x ~{response}-token responses:")
    for k, value in parts.items():
        if k not in ("peak", "vllm", "overhead"):
            print(f"  plan {k:12s} {value / 2**20:8.1f} MiB")
    print(f"  plan total        {predicted / 2**20:8.1f} MiB\n  measured growth   {measured / 2**20:8.1f} MiB "
          f"(peak RSS {peak_kib / 1024:.0f} MiB - {base_kib / 1024:.0f} MiB after imports); ratio "
          f"{measured / predicted:.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compare the plan with one measured CPU OPCD step")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward pass")
    p.add_argument("--check-size", default="medium", choices=["tiny", "small", "medium"], help="--check: the model size")
    p.add_argument("--check-tokens", type=int, default=256, help="--check: new tokens of the step's responses")
    args = p.parse_args()
    if args.check:
        check(args.check_size, args.check_tokens)
    else:
        print(table(args.micro_batch))
