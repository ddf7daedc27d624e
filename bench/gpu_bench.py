"""Speed and memory of the training steps at real size: random-weight Qwen3-VL-4B / 8B on one GPU.

No download: the architectures are written out in bench/memory_plan.py (their published configs) and
the weights are random, which costs the same FLOPs and bytes as the trained ones. The tokenizer and
image processor are the project's tiny ones (their ids are valid in the 151,936-token vocabulary);
pictures are 256 px, as for real models. Each mode measures today's code beside the variants it can
switch off, in one run:

  sft      one sft.py step (LoRA r16, --micro-batch x --seq-len random tokens, bf16 autocast on GPU) per
           variant: "before" is the code as it was (fp32 frozen weights, LoRA as two separate products, the
           [tokens, vocab] fp32 logits at once, every layer recomputed); each change alone; all of them.
           tokens/s, peak memory, MFU and hardware utilisation counted honestly (flops_per_token).
  opcd     one opcd.opcd_step at --batch prompts x (prompt + --new-tokens), micro-batch --micro-batch,
           full fine-tuning with --master, a frozen bf16 teacher of the same size: the rollout is a fixed
           response of exactly --new-tokens random ids (so the step has the asked shape; the rollout's own
           speed is the rollout mode's); "before" = whole-logit log-probs and whole-tensor optimiser temporaries.
  rollout  HF generate of --rollout-batch prompts x --rollout-tokens (random weights never stop): ms a
           decoding step with the dynamic KV cache (before) and the static one (compiled on GPU).

On CPU it runs a thin slice (--layers 1 --vocab 4096 --narrow 8, small batches) so that a test keeps it working.

    bash bench/gpu_check.sh                                            # GPU: every mode, the prepared check
    python bench/gpu_bench.py --only sft --micro-batch 4 --seq-len 2048
"""
import argparse
import contextlib
import functools
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import memory_plan  # noqa: E402
import opcd  # noqa: E402
import sft  # noqa: E402
from mgsd import common, lora, optim, splits, tiny  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s of the SXM cards (datasheets)


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU: the process's peak RSS


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device):
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
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


# ------------------------------------------------------------------------------------------
# The honest count


def flops_per_token(model, seq_len, checkpoint_share, chunked_loss):
    """(model FLOPs, hardware FLOPs) a trained token of a text-only step. Model FLOPs: 2 N forward and 2 N
    input-gradient for every matrix that runs (decoder linears, LoRA factors, the head; not the embedding
    lookup, not the vision tower, which a text step never runs), 2 N weight-gradient for the trainable ones
    only, and causal attention (QK^T and AV over the S/2 earlier positions on average: 2 S d forward, twice that
    backward, d = heads x head_dim). Hardware FLOPs add what the step recomputes: the forward of the
    checkpointed layers, and the head again for a chunked loss."""
    text = model.config.get_text_config()
    layers, d = text.num_hidden_layers, text.num_attention_heads * text.head_dim
    decoder = [m.weight for m in model.model.language_model.layers.modules() if isinstance(m, torch.nn.Linear)]
    n_decoder, n_head = sum(w.numel() for w in decoder), model.lm_head.weight.numel()
    n_trained = sum(w.numel() for w in decoder + [model.lm_head.weight] if w.requires_grad)
    attention = 2 * seq_len * d * layers  # forward, causal
    model_flops = 4 * (n_decoder + n_head) + 2 * n_trained + 3 * attention
    recomputed = round(checkpoint_share * layers) / layers
    return model_flops, model_flops + recomputed * (2 * n_decoder + attention) + (2 * n_head if chunked_loss else 0)


def old_count(model, seq_len):
    """The count RESULTS.md used before: 6 N over every parameter (vision tower and embedding too, weight
    gradients for frozen weights) + non-causal attention (PaLM's 12 L S d)."""
    text = model.config.get_text_config()
    n = sum(p.numel() for p in model.parameters())
    return 6 * n + 12 * text.num_hidden_layers * seq_len * text.num_attention_heads * text.head_dim


# ------------------------------------------------------------------------------------------
# The code as it was, for the "before" rows


def lora_forward_before(self, x):  # two products, a scale and an add (the adapters in x's dtype, as they were)
    low = F.linear(F.linear(self.dropout(x), self.lora_A.weight.to(x.dtype)), self.lora_B.weight.to(x.dtype))
    return self.base_layer(x) + low * self.scaling


def sft_loss_before(model, batch, train_vision=False, chunk=None):
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}  # the tower ran inside the forward
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         mm_token_type_ids=batch["mm_token_type_ids"], use_cache=False, **images)[0]
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    return F.cross_entropy(model.lm_head(hidden[:, :-1][keep]).float(), targets[keep], reduction="sum")


def response_logprobs_before(model, prompt_batch, response_ids, response_mask, temperature=1.0, chunk=None):
    out = model(**common.response_inputs(prompt_batch, response_ids, response_mask), logits_to_keep=response_ids.shape[1] + 1)
    return common.token_logprobs(out.logits[:, :-1] / temperature, response_ids)


@contextlib.contextmanager
def patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


# ------------------------------------------------------------------------------------------
# The modes


SFT_VARIANTS = {  # name: frozen weights in bf16, fused LoRA, chunked loss, share of layers recomputed (0: none), compile
    "before (fp32 frozen, unfused, whole logits, all layers recomputed)": (False, False, False, 1.0, False),
    "all but compile": (True, True, True, 0.0, False),
    "all": (True, True, True, 0.0, True),
    "all but compile, a quarter of the layers checkpointed": (True, True, True, 0.25, False),
    "before + bf16 frozen weights": (True, False, False, 1.0, False),
    "before + fused LoRA": (False, True, False, 1.0, False),
    "before + chunked loss": (False, False, True, 1.0, False),
    "before + no checkpointing": (False, False, False, 0.0, False),
    "before + compile": (False, False, False, 1.0, True),
}


def bench_sft(cfg, processor, args, device, variant):
    bf16, fused, chunked, share, compiled = variant
    model = random_model(cfg, device, torch.float32, processor)
    lora.add_lora(model, 16, 32, 0.0)
    for p in model.parameters():  # as sft.py --dtype: frozen weights bf16, the adapters fp32
        if not p.requires_grad and bf16:
            p.data = p.data.to(torch.bfloat16)
    if share:
        common.enable_checkpointing(model, share)
    if compiled:
        for layer in model.model.language_model.layers:
            layer.compile()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": ids, "mm_token_type_ids": torch.zeros_like(ids)}
                for ids in torch.randint(0, 1000, (args.micro_batch, args.seq_len), generator=g)]
    batch = {k: v.to(device) for k, v in sft.collate(examples, processor.tokenizer.pad_token_id).items()}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    loss_fn = sft.sft_loss if chunked else sft_loss_before
    forward = lora.LoRALinear.forward if fused else lora_forward_before
    reset_peak(device)
    times = []
    with patched(lora.LoRALinear, "forward", forward):
        for _ in range(args.steps + (3 if compiled else 1)):  # warm-up steps (allocator, kernels, compile) untimed
            start = time.time()
            with autocast:
                loss = loss_fn(model, batch) / args.micro_batch / args.seq_len
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.time() - start)
    seconds = sorted(times[-args.steps:])[args.steps // 2]  # the median timed step
    tokens_per_s = args.micro_batch * args.seq_len / seconds
    model_flops, hardware_flops = flops_per_token(model, args.seq_len, share, chunked)
    peak = args.peak_flops
    return {"s/step": seconds, "tokens/s": tokens_per_s, "peak GiB": peak_memory(device),
            "MFU %": 100 * model_flops * tokens_per_s / peak if peak else None,
            "HFU %": 100 * hardware_flops * tokens_per_s / peak if peak else None,
            "old count %": 100 * old_count(model, args.seq_len) * tokens_per_s / peak if peak else None}


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


def bench_opcd(cfg, processor, rows, args, device, loss, before):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(cfg, device, dtype, processor)
    teacher = random_model(cfg, device, dtype, processor).requires_grad_(False).eval()
    argv = ["--model", "-", "--teacher", "-", "--data", "-", "--out", "-", "--rollout", "hf", "--loss", loss,
            "--batch-size", args.batch, "--micro-batch-size", args.micro_batch, "--max-new-tokens", args.new_tokens,
            "--master", args.master]
    run_args = opcd.parse_args(list(map(str, argv)))
    common.enable_checkpointing(model)
    model.train()
    opt = TimedAdamW(model.parameters(), 1e-6, (0.9, 0.999), 0.01, args.master)
    g = torch.Generator().manual_seed(0)

    def fixed_rollout(*a, **kw):  # exactly --new-tokens ids a response (never the end-of-turn token)
        return [dict(token_ids=torch.randint(0, 1000, (args.new_tokens,), generator=g).tolist(), text="", finished=False,
                     logprobs=None) for _ in rows[:args.batch]]

    stochastic = functools.partialmethod(optim.MasterAdamW.stochastic_step, chunk=1 << 40 if before else 1 << 24)
    reset_peak(device)
    TimedAdamW.seconds = 0.0
    with patched(common, "sample_responses", fixed_rollout), patched(optim.MasterAdamW, "stochastic_step", stochastic), \
            patched(common, "response_logprobs", response_logprobs_before if before else common.response_logprobs):
        log = opcd.opcd_step(run_args, 0, rows[:args.batch], model, teacher, None, processor, opt, 1, device)
    return {"teacher s": log["seconds_teacher"], "student fwd/bwd s": log["seconds_train"] - TimedAdamW.seconds,
            "optimiser s": TimedAdamW.seconds, "response tokens": log["response_tokens"], "peak GiB": peak_memory(device)}


def bench_rollout(cfg, processor, rows, args, device, cache):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = random_model(cfg, device, dtype, processor).eval()
    chats = [opcd.student_turns([r])[0] for r in (rows * args.rollout_batch)[:args.rollout_batch]]
    reset_peak(device)
    times = []
    for _ in range(2):  # the first call warms up (and compiles, for the static cache)
        start = time.time()
        outs = common.generate_responses(model, processor, chats, args.rollout_tokens, temperature=1.0, seed=0, cache=cache)
        sync(device)
        times.append(time.time() - start)
    tokens = max(len(o["token_ids"]) for o in outs)
    return {"first call s": times[0], "s": times[1], "ms/step": 1000 * times[1] / tokens, "tokens": tokens,
            "peak GiB": peak_memory(device)}


def run(fn, *a):
    """fn's row, or a row of n/a with the reason (out of memory, or a variant that fails on this stack)."""
    try:
        return fn(*a)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as e:  # noqa: BLE001  a failing variant (e.g. compile on this torch) must not hide the others
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def table_row(name, r, keys):
    cells = [r["error"]] + [""] * (len(keys) - 1) if "error" in r else ["n/a" if r[k] is None else f"{r[k]:.3g}" for k in keys]
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="Qwen3-VL-4B", choices=sorted(memory_plan.ARCHS), help="architecture")
    p.add_argument("--layers", type=int, default=None, help="cut to this many decoder layers / vision blocks")
    p.add_argument("--vocab", type=int, default=None, help="cut the vocabulary (CPU smoke runs)")
    p.add_argument("--narrow", type=int, default=1, help="divide widths and head counts by this (CPU smoke runs)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward pass")
    p.add_argument("--seq-len", type=int, default=2048, help="SFT sequence length")
    p.add_argument("--steps", type=int, default=3, help="timed SFT steps (after the warm-up), the median reported")
    p.add_argument("--sft-variants", nargs="+", default=list(range(len(SFT_VARIANTS))), type=int,
                   help="which SFT rows to run (indices into SFT_VARIANTS, in order)")
    p.add_argument("--batch", type=int, default=4, help="OPCD prompts per step")
    p.add_argument("--new-tokens", type=int, default=2048, help="OPCD response length (a fixed response of this many ids)")
    p.add_argument("--master", default="stochastic", choices=["fp32", "stochastic", "bf16"], help="OPCD --master")
    p.add_argument("--rollout-batch", type=int, default=32, help="rollout mode: prompts per generate call")
    p.add_argument("--rollout-tokens", type=int, default=128, help="rollout mode: new tokens per prompt")
    p.add_argument("--only", nargs="+", default=["sft", "opcd", "rollout"], choices=["sft", "opcd", "rollout"],
                   help="which modes")
    p.add_argument("--markdown", default=None, help="also append the tables to this file")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    args.peak_flops = next((v for k, v in PEAK_BF16.items() if k in card), None)
    cfg = memory_plan.config(memory_plan.ARCHS[args.arch], args.layers, args.vocab, args.narrow)
    import transformers

    header = (f"{args.arch}{' (a thin slice)' if args.layers or args.vocab or args.narrow > 1 else ''} on {card}, torch "
              f"{torch.__version__}, transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        processor = common.load_model(tiny.build_model(Path(tmp) / "tok", "tiny", image_size=256))[1]
        rows = splits.load_split(splits.make_split(Path(tmp) / "data", "train", 2, tasks=["frozenlake", "maze", "minibehaviour"],
                                                   levels={"frozenlake": [4], "maze": [4], "minibehaviour": [5]},
                                                   kinds=("planning",), image_size=256), kinds=["planning"])
        rows = (rows * args.batch)[:max(args.batch, len(rows))]

        def write(text):
            print(text, flush=True)
            if args.markdown:
                with open(args.markdown, "a") as f:
                    f.write(text + "\n")

        def emit(title, keys, runs):
            """The table, a row at a time as each run ends: a check cut short keeps the rows it finished."""
            write(f"### {title}\n\n| run | " + " | ".join(keys) + " |\n|---|" + "---|" * len(keys))
            for name, call in runs:
                write(table_row(name, call(), keys))
            write("")

        write(f"## {header}\n")
        if "sft" in args.only:
            names = list(SFT_VARIANTS)
            emit(f"SFT step, LoRA r16: micro-batch {args.micro_batch} x {args.seq_len} tokens "
                 f"(MFU and HFU against {args.peak_flops or 0:.3g} FLOP/s)",
                 ["s/step", "tokens/s", "peak GiB", "MFU %", "HFU %", "old count %"],
                 [(names[i], functools.partial(run, bench_sft, cfg, processor, args, device, SFT_VARIANTS[names[i]]))
                  for i in args.sft_variants])
        if "opcd" in args.only:
            emit(f"OPCD step: {args.batch} prompts x (prompt + {args.new_tokens}) tokens, micro-batch {args.micro_batch}, "
                 f"full fine-tuning, --master {args.master}, frozen teacher, checkpointing on",
                 ["teacher s", "student fwd/bwd s", "optimiser s", "response tokens", "peak GiB"],
                 [(f"--loss {loss}{', before' if before else ''}",
                   functools.partial(run, bench_opcd, cfg, processor, rows, args, device, loss, before))
                  for loss, before in (("sampled", True), ("sampled", False), ("full", False))])
        if "rollout" in args.only:
            emit(f"HF rollout: {args.rollout_batch} prompts x {args.rollout_tokens} new tokens, bf16 on GPU",
                 ["first call s", "s", "ms/step", "tokens", "peak GiB"],
                 [(f"{cache} KV cache{' (before)' if cache == 'dynamic' else ''}",
                   functools.partial(run, bench_rollout, cfg, processor, rows, args, device, cache))
                  for cache in ("dynamic", "static")])


if __name__ == "__main__":
    main()
