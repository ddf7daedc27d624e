"""Stage 1 of MGSD: supervised fine-tuning of a Qwen-VL model on chat rows (docs/method.md §7).

The loss is on the assistant tokens only (each turn up to and including its <|im_end|>), a token mean over
the *global* batch, so that 1 and N ranks take the same step (LLaMA-Factory averages per micro-batch);
AdamW, linear warm-up from lr/warmup, then cosine decay; one all-reduce of the gradients a step. Trainable:
a LoRA (rank 8, alpha 16) on the language model's q/k/v/o/gate/up/down, or with --full every language-model
weight; the vision tower runs frozen under no_grad unless --train-vision. Every epoch is a seeded
permutation (the last partial batch dropped), so --resume repeats an uninterrupted run exactly. Rows longer
than --max-length are cut on the right (an error if the cut hits an image). Validation: the loss and greedy
answers scored by splits.score_row.
Out: adapter/ (PEFT format, for merge.py) or model/ (--full), checkpoint/ (--resume), log.jsonl, args.json,
tb/. Commands: README.md, "Stage 1".
"""
import argparse
import functools
import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from mgsd import cli, common, lora, splits, tracking
from mgsd.common import print0
from mgsd.optim import all_reduce_grads, global_sum, require_finite_weights


def parse_args(argv=None):
    p = cli.Parser(prog="sft.py", description="MGSD stage 1: SFT (LoRA or full) of a Qwen-VL model on chat rows")
    p.add_argument("--model", required=True, help="base model: local folder or hub id")
    p.add_argument("--data", required=True, nargs="+", help="training split directories (data.jsonl + images), concatenated")
    p.add_argument("--val-data", default=None, nargs="+", help="validation split directories (optional)")
    p.add_argument("--out", required=True, help="output directory (adapter/ or model/, checkpoint/, log.jsonl)")
    p.add_argument("--kinds", default="perception", type=cli.names,
                   help="comma-separated row kinds to train on: perception, planning, text-planning, teacher, dynamics, vision "
                        "(stage 1 never trains on plans)")
    p.add_argument("--full", action="store_true", help="train every language-model weight instead of a LoRA")
    p.add_argument("--train-vision", action="store_true",
                   help="also train the vision tower and merger in full (frozen by default, as in the reference)")
    p.add_argument("--lora-rank", type=cli.positive_rank, default=8, help="LoRA rank r")
    p.add_argument("--lora-alpha", type=cli.lora_alpha, default=16, help="LoRA alpha (scaling alpha/r)")
    p.add_argument("--lora-dropout", type=cli.nonneg_float, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--lr", type=cli.learning_rate, default=1e-4, help="peak learning rate")
    p.add_argument("--warmup-ratio", type=cli.fraction, default=0.1, help="fraction of steps of linear warm-up")
    p.add_argument("--weight-decay", type=cli.nonneg_float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=cli.nonneg_float, default=1.0, help="gradient-norm clip (0 = off)")
    p.add_argument("--epochs", type=cli.epochs, default=3, help="number of passes over the training rows")
    p.add_argument("--batch-size", type=cli.positive_int, default=64, help="effective (global) batch in rows per optimiser step")
    p.add_argument("--micro-batch-size", type=cli.positive_int, default=4, help="rows per forward on each device (accumulation fills the rest)")
    p.add_argument("--max-length", type=cli.positive_int, default=2048, help="maximum tokens per row (cut on the right)")
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="non-reentrant gradient checkpointing of the decoder layers")
    p.add_argument("--checkpoint-share", type=cli.fraction, default=1.0,
                   help="with --grad-checkpointing: the share of decoder layers recomputed, spread evenly (the others keep "
                   "their activations: faster, more memory; default 1, all)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of the frozen weights (trained ones stay fp32); auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (GPU; the first steps compile)")
    p.add_argument("--loader-workers", type=cli.nonneg_int, default=None,
                   help="processes that encode the next steps' rows (chat template, image processor); default 4 on GPU, "
                        "0 on CPU (encode in the training process)")
    p.add_argument("--loss-chunk", type=cli.positive_int, default=1024,
                   help="labelled positions per chunk of the output head and cross-entropy (memory O(chunk x vocab))")
    p.add_argument("--val-every", type=cli.nonneg_int, default=0, help="validate every N steps (0: only at the end)")
    p.add_argument("--save-every", type=cli.nonneg_int, default=0, help="write checkpoint/ every N steps (0: only at the end)")
    p.add_argument("--val-size", type=cli.positive_int, default=64, help="validation rows used for loss and generation")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=512, help="generation budget of validation answers")
    p.add_argument("--max-steps", type=cli.nonneg_int, default=0,
                   help="stop after this many steps, 0 = no limit (the schedule still spans all epochs)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (same settings; see RESUMABLE)")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that already holds a run")
    p.add_argument("--report-to", default="none", choices=tracking.CHOICES,
                   help="also send log.jsonl's numbers and the settings to this tracker (installed separately)")
    p.add_argument("--seed", type=cli.seed, default=0, help="seed of LoRA init and data order")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Data: chat row -> input ids + labels (assistant tokens only)


def encode_chat(processor, messages, max_length=2048):
    """Token ids, labels (-100 except assistant tokens) and image tensors of one chat.
    Each assistant turn is labelled up to and including its <|im_end|>."""
    tok = processor.tokenizer
    render = processor.apply_chat_template
    segments, prev = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(messages[:i], tokenize=False, add_generation_prompt=True)
        full = render(messages[:i + 1], tokenize=False)
        if not (prompt.startswith(prev) and full.startswith(prompt)):
            raise ValueError("chat template is not prefix-stable; cannot locate the assistant tokens")
        answer = full[len(prompt):]
        end = answer.rfind("<|im_end|>") + len("<|im_end|>") if "<|im_end|>" in answer else len(answer)
        segments += [(prompt[len(prev):], False), (answer[:end], True), (answer[end:], False)]
        prev = full
    if not segments:
        raise ValueError("chat has no assistant turn to train on")
    images, out, n_tokens = common.message_images(messages), {}, []
    if images:
        vision = processor.image_processor(images=images, return_tensors="pt")
        out = {"pixel_values": vision["pixel_values"], "image_grid_thw": vision["image_grid_thw"]}
        n_tokens = [int(g.prod()) // processor.image_processor.merge_size ** 2 for g in vision["image_grid_thw"]]
    ids, labels = [], []
    for text, trained in segments:
        pieces = text.split("<|image_pad|>")  # expand each image placeholder to its token count
        if len(pieces) - 1 > len(n_tokens):
            raise ValueError("more image placeholders than images in the chat")
        text = pieces[0] + "".join("<|image_pad|>" * n_tokens.pop(0) + p for p in pieces[1:])
        seg = tok(text, add_special_tokens=False)["input_ids"] if text else []
        ids += seg
        labels += seg if trained else [-100] * len(seg)
    if n_tokens:
        raise ValueError("more images than image placeholders in the chat")
    ids, labels = torch.tensor(ids), torch.tensor(labels)
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    if len(ids) > max_length:
        if (ids[max_length:] == image_id).any():
            raise ValueError(f"a prompt longer than --max-length {max_length} would cut an image")
        ids, labels = ids[:max_length], labels[:max_length]
    out.update(input_ids=ids, labels=labels, mm_token_type_ids=(ids == image_id).long())
    return out


def collate(examples, pad_id):
    """Right-padded batch of encode_chat outputs; target_positions: the flat indices of the labelled
    positions of labels[:, 1:] (found here on the CPU, so the step never waits on the GPU for them)."""
    L = max(len(e["input_ids"]) for e in examples)
    batch = {"input_ids": torch.full((len(examples), L), pad_id), "labels": torch.full((len(examples), L), -100),
             "attention_mask": torch.zeros(len(examples), L, dtype=torch.long),
             "mm_token_type_ids": torch.zeros(len(examples), L, dtype=torch.long)}
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        batch["input_ids"][i, :n], batch["labels"][i, :n] = e["input_ids"], e["labels"]
        batch["attention_mask"][i, :n], batch["mm_token_type_ids"][i, :n] = 1, e["mm_token_type_ids"]
    with_images = [e for e in examples if "pixel_values" in e]
    if with_images:
        batch["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
        batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
    batch["target_positions"] = (batch["labels"][:, 1:] != -100).flatten().nonzero().squeeze(1)
    return batch


def sft_loss(model, batch, train_vision=False, chunk=1024):
    """Summed NLL of the labelled tokens (the head and cross-entropy `chunk` positions at a time,
    common.chunked_logprobs); a frozen vision tower runs under no_grad."""
    extra = {}
    if "pixel_values" in batch:
        with torch.set_grad_enabled(train_vision and torch.is_grad_enabled()):
            image = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        extra = {"mm_encoder_outputs": {"image": image}, "image_grid_thw": batch["image_grid_thw"]}
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         mm_token_type_ids=batch["mm_token_type_ids"], use_cache=False, **extra)[0]
    at = batch["target_positions"]  # only the labelled positions go through the (large-vocabulary) head
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, at)
    return -common.chunked_logprobs(hidden, model.lm_head, batch["labels"][:, 1:].flatten().index_select(0, at), chunk).sum()


def step_batches(step, rows, steps_per_epoch, args, processor, rank, per_rank):
    """This rank's share of the global batch of `step`, encoded, in micro-batches. Every epoch is a seeded
    permutation."""
    epoch, index = divmod(step, steps_per_epoch)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
    batch_rows = [rows[i] for i in order[index * args.batch_size:(index + 1) * args.batch_size].tolist()]
    mine = [encode_chat(processor, r["messages"], args.max_length) for r in batch_rows[rank * per_rank:(rank + 1) * per_rank]]
    return micro_batches(mine, args.micro_batch_size, processor.tokenizer.pad_token_id)


def micro_batches(examples, size, pad_id):
    """Encoded rows in micro-batches of `size` rows of similar length (common.micro_batches): less padding, and the
    step's summed loss is the same in any grouping."""
    groups = common.micro_batches([len(e["input_ids"]) for e in examples], size)
    return [collate([examples[i] for i in ix], pad_id) for ix in groups]


def lr_at(step, total_steps, peak_lr, warmup_ratio):
    """Linear warm-up to peak_lr, then cosine decay to 0 (step counts from 0)."""
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------
# Validation: loss + generate-and-score on the val split


@torch.no_grad()
def validate(model, processor, rows, args, rank, world, device, autocast):
    was_training = model.training
    model.eval()
    mine = rows[rank::world]
    nll, n_tok, scores = 0.0, 0, []  # scores: (metric name, value) of every scored answer on this rank
    pad = processor.tokenizer.pad_token_id
    for i in range(0, len(mine), args.micro_batch_size):
        chunk = mine[i:i + args.micro_batch_size]
        batch = {k: v.to(device) for k, v in collate([encode_chat(processor, r["messages"], args.max_length)
                                                     for r in chunk], pad).items()}
        n_tok += int((batch["labels"][:, 1:] != -100).sum())
        with autocast:
            nll += sft_loss(model, batch).item()
            responses = [o["text"] for o in common.generate_responses(model, processor, [r["messages"][:-1] for r in chunk],
                                                                       args.max_new_tokens)]
        scores += [(f"val/{row['kind']}/{key}", float(value)) for row, response in zip(chunk, responses)
                   for key, value in splits.score_row(row, response).items() if isinstance(value, (bool, float))]
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, scores)
        scores = [s for part in gathered for s in part]
    totals = global_sum([nll, n_tok], device)
    metrics = {"val/loss": float(totals[0] / max(1, totals[1]))}
    by_name = {}
    for name, value in scores:
        by_name.setdefault(name, []).append(value)
    metrics.update({name: sum(v) / len(v) for name, v in sorted(by_name.items())})
    model.train(was_training)
    return metrics


# ------------------------------------------------------------------------------------------
# Checkpoints: the trainable tensors + optimiser state + step, written atomically


def save_checkpoint(path, model, optimizer, step):
    from safetensors.torch import save_file

    weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    cli.require_finite(weights, f"refusing to write {path}")
    with cli.atomic_dir(path) as tmp, cli.write_failure(path):
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}) + "\n")


def load_checkpoint(path, model, optimizer):
    from safetensors.torch import load_file

    try:
        weights, params = load_file(str(path / "trainable.safetensors")), dict(model.named_parameters())
        if set(weights) != {n for n, p in params.items() if p.requires_grad}:
            raise ValueError("checkpoint does not match this model/LoRA set-up (was it trained with other flags?)")
        cli.require_finite(weights, "trainable.safetensors")
        for n, t in weights.items():
            params[n].data.copy_(t)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu"))
        return int(json.loads((path / "state.json").read_text())["step"])
    except Exception as e:  # a truncated or foreign file: safetensors, torch and pickle raise many types
        raise ValueError(f"{path}: cannot resume from it ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})") from None


# Settings that may change when a run is resumed; any other difference is refused.
RESUMABLE = {"resume", "overwrite", "max_steps", "val_every", "save_every", "val_size", "val_data", "max_new_tokens",
             "grad_checkpointing", "checkpoint_share", "compile", "loader_workers", "loss_chunk",
             "data_sha256", "report_to"}  # the data: cli.check_data


def main(argv=None):
    args = parse_args(None if argv is None else [str(a) for a in argv])
    out = Path(args.out)
    cli.check_out(out, args.resume, args.overwrite, [args.model, *args.data, *(args.val_data or ())], "sft.py")
    tracking.check_installed(args.report_to)
    if args.train_vision and not args.full:
        cli.fail("--train-vision needs --full (a LoRA adapter holds no vision weights)")
    if args.resume:
        cli.recover_dir(out / "checkpoint")
        if not (out / "checkpoint" / "state.json").is_file():
            cli.fail(f"--resume: no checkpoint in {out / 'checkpoint'}")
        cli.check_resume(cli.saved_args(out / "args.json"), args, RESUMABLE)
    ddp, rank, _, world, device = common.compute_init(args.seed)
    try:
        kinds = args.kinds.split(",")
        rows = [r for d in args.data for r in splits.load_split(d, kinds=kinds) if r.get("messages")]
        args.data_sha256 = splits.fingerprint(args.data)
        cli.check_data(out, args)
        val_rows = [r for d in args.val_data or () for r in splits.load_split(d, kinds=kinds)]
        val_rows = val_rows[::max(1, len(val_rows) // max(1, args.val_size))][:args.val_size]  # spread over tasks
        if not rows:
            raise ValueError(f"{' '.join(args.data)}: no rows with messages of kinds {kinds}")
        if len({splits.row_key(r) for r in rows}) < len(rows):  # e.g. a folder given twice: rows would count twice
            raise ValueError(f"--data {' '.join(args.data)}: a row (id and kind) appears twice across the folders")
        if any(r.get("split") == "test" for r in rows) and rank == 0:
            cli.warn("--data holds rows of the test split: a model trained on them cannot be evaluated on it")
        if args.batch_size % world or args.batch_size > len(rows):
            raise ValueError(f"--batch-size {args.batch_size} must be a multiple of the {world} ranks and at most "
                             f"the {len(rows)} training rows")
        model, processor = common.load_model(args.model, device)
        context = model.config.get_text_config().max_position_embeddings
        if val_rows and args.max_new_tokens > context:  # a budget past the context would run for nothing
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} exceeds the model's context of {context} tokens")
        for r in rows[:1] + val_rows:  # fail now, not after an hour, on a row the template cannot encode
            encode_chat(processor, r["messages"], args.max_length)
        # Trainable: a LoRA on the language model, or (--full) the language model + lm_head; --train-vision: the tower too
        if args.full:
            for n, p in model.named_parameters():
                p.requires_grad_(not n.startswith("model.visual."))
        else:
            lora.add_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout)
        if args.train_vision:
            model.model.visual.requires_grad_(True)
        frozen = getattr(torch, args.dtype) if args.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
        for p in model.parameters():  # frozen weights in bf16 (GPU): no re-cast each forward, half the bytes
            if not p.requires_grad:
                p.data = p.data.to(frozen)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        step = load_checkpoint(out / "checkpoint", model, optimizer) if args.resume else 0
    except (FileNotFoundError, ValueError) as e:
        common.compute_cleanup()
        cli.fail(str(e).splitlines()[0])
    if args.grad_checkpointing:
        common.enable_checkpointing(model, args.checkpoint_share)
    if args.compile:
        for layer in model.model.language_model.layers:
            layer.compile()
    model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    steps_per_epoch = len(rows) // args.batch_size
    total_steps = max(1, int(steps_per_epoch * args.epochs))
    last_step = min(total_steps, args.max_steps) if args.max_steps else total_steps
    per_rank = args.batch_size // world
    print0(f"sft: {len(rows)} rows, {world} rank(s), {total_steps} steps of {args.batch_size} rows, "
           f"{'full' if args.full else f'LoRA r{args.lora_rank}'} ({sum(p.numel() for p in params) / 1e6:.2f}M "
           f"trainable), from step {step}")
    if rank == 0:
        cli.claim_out(out, clear=args.overwrite and not args.resume)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    log = tracking.RunLog(out, step if args.resume else None, rank, args.report_to, vars(args))
    bar = tqdm(total=last_step, initial=step, desc="sft", dynamic_ncols=True, disable=rank != 0)

    workers = args.loader_workers if args.loader_workers is not None else 4 if device.type == "cuda" else 0
    encode = functools.partial(step_batches, rows=rows, steps_per_epoch=steps_per_epoch, args=args, processor=processor,
                               rank=rank, per_rank=per_rank)
    loader = torch.utils.data.DataLoader(range(step, last_step), batch_size=None, collate_fn=encode, num_workers=workers,
                                         pin_memory=device.type == "cuda")
    t0, tokens_seen, saved_step = time.time(), 0, step
    try:  # a NaN or inf in a gradient or in weights about to be written, or a failed write, stops the run in one line
        for micro in loader:
            # ALGO LOGIC: this rank's share of the global batch, in micro-batches; the loss is a token mean over all ranks
            n_target = torch.tensor(float(sum(len(b["target_positions"]) for b in micro)), device=device)
            if ddp:
                dist.all_reduce(n_target)  # kept on the device: the step never waits for the GPU before its last line
            lr = lr_at(step, total_steps, args.lr, args.warmup_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            nll_sum = torch.zeros((), device=device)
            for b in micro:
                tokens_seen += int(b["attention_mask"].sum())
                b = {k: v.to(device, non_blocking=True) for k, v in b.items()}
                with autocast:
                    nll = sft_loss(model, b, args.train_vision, args.loss_chunk)
                (nll / n_target.clamp(min=1.0)).backward()  # the token mean over the global batch, once summed over ranks
                nll_sum += nll.detach()
            all_reduce_grads(params, world)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or math.inf)  # 0: the norm, no clip
            if not torch.isfinite(grad_norm):  # the same on every rank: the step is not taken
                raise cli.NonFinite(f"step {step + 1}: gradient norm {grad_norm.item()}, the step was not taken")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            require_finite_weights(params)  # an update that overflowed: stop before it is saved or sampled from
            step += 1

            loss = global_sum([nll_sum.item()], device)[0] / max(1.0, n_target.item())
            log({"step": step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm), "epoch": step / steps_per_epoch,
                 "tokens_per_second": tokens_seen * world / (time.time() - t0)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if (args.save_every and step % args.save_every == 0) or step == last_step:  # before a validation can crash
                if rank == 0:
                    save_checkpoint(out / "checkpoint", model, optimizer, step)
                    saved_step = step
                if ddp:
                    dist.barrier()
            if val_rows and ((args.val_every and step % args.val_every == 0) or step == last_step):
                val = validate(model, processor, val_rows, args, rank, world, device, autocast)
                log({"step": step, **val})
                print0(f"step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in val.items()))

        if ddp:  # one all-reduce a step keeps the replicas identical; check it rather than trust it
            flat = torch.cat([p.detach().float().flatten() for p in params])
            replicas = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(replicas, flat)
            spread = max((r - replicas[0]).abs().max().item() for r in replicas)
            log({"step": step, "ddp/replica_max_abs_diff": spread})
            print0(f"ddp: replicas differ by at most {spread:.3g}")
        if rank == 0:  # the product of this run (after --max-steps: the weights at that step)
            if args.full:
                model.gradient_checkpointing_disable()
                common.save_model(model, processor, out / "model")
            else:
                lora.save_adapter(model, out / "adapter", args.model)
            print0(f"wrote {out / ('model' if args.full else 'adapter')}")
    except (cli.NonFinite, OSError) as e:  # a NaN, or a disk that is full: the last whole checkpoint stays
        bar.close()
        cli.fail(f"{e}; " + (f"{out / 'checkpoint'} keeps step {saved_step}, --resume continues from it" if saved_step
                             else "no checkpoint was written yet"))
    bar.close()
    log.close()
    common.compute_cleanup()


if __name__ == "__main__":
    cli.interruptible(main, "--resume continues from the last checkpoint (OUT/checkpoint)")
