"""Stage 2 of MGSD: on-policy context distillation (OPCD), one file, plain PyTorch.

The algorithm (SPEC §8). Every step, on a batch of training instances mixed over tasks/levels:
  1. Rollout: the student sees the task *image* and samples one response per prompt
     (T 1.0, top-p 1.0, up to --max-new-tokens; vision special tokens are never sampled).
  2. Teacher: a frozen model sees the privileged *symbolic state* as text (and, by default,
     the reference plan) and scores the student's exact response token ids (never
     re-tokenised; the mask includes the first end-of-turn token): ℓ_T = log π_T(y_t | text, y<t).
  3. Loss: the per-token reverse KL KL(π_S(·|image, y<t) ‖ π_T(·|text, y<t)) on the student's
     own prefixes, as REINFORCE with the detached advantage A_t = ℓ_T,t − ℓ_S,t and a token
     mean over the whole global batch (the reference's estimator); or the exact KL over the
     vocabulary (--loss full).
  4. Step: AdamW (lr 1e-6, wd 0.01, constant), grad-norm clip 1.0, fp32 master weights.
Validation every --val-every steps on the val split (T 0.6, top-p 0.95, macro success of
envs.aggregate); best (by macro success) and last checkpoints are ordinary HF folders.

Simplifications and deviations from the reference (EasyR1/verl fork, ~10k lines):
- fp32 master weights and Adam states by default; the reference keeps them in bf16, where a
  1e-6 step rounds away for almost every weight (--bf16-master reproduces it).
- One process per device; ranks sum gradients with one all-reduce after the backward passes
  (no DDP wrapper, no Ray, no FSDP: a model must fit on one device; --fsdp is not implemented).
- The teacher is a Hugging Face forward pass (no_grad) inside the trainer, not a separate worker.
- Rollout log-probs are always recomputed by the trainer (vLLM's are only logged, as a drift check).
- Randomness is seeded from (--seed, step, rank), so --resume is exact without saving RNG states.
- With --loss full the KL uses the full softmax of both models (the vision tokens the sampler
  forbids keep their tiny probability mass).

Command lines:
  python common.py tiny --out models/tiny && python envs.py data --out data/train --split train --per-level 8 --image-size 128
  python envs.py data --out data/val --split val --per-level 2 --image-size 128
  python opcd.py --student models/tiny --train-data data/train --val-data data/val --out runs/opcd-tiny \\
      --rollout hf --batch-size 8 --max-new-tokens 64 --max-steps 20
  # Qwen3-VL-4B: student = the merged stage-1 checkpoint, teacher = the base model (one GPU)
  python opcd.py --student runs/sft-4b-merged --teacher Qwen/Qwen3-VL-4B-Instruct \\
      --train-data data/train --val-data data/val --out runs/opcd-4b --rollout vllm
  # the same on 8 GPUs (global batch 32 = 4 per rank)
  torchrun --nproc_per_node=8 opcd.py --student runs/sft-4b-merged --teacher Qwen/Qwen3-VL-4B-Instruct \\
      --train-data data/train --val-data data/val --out runs/opcd-4b --rollout vllm
"""
import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import common
import envs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="MGSD stage 2: on-policy context distillation (OPCD)")
    a = p.add_argument
    a("--student", required=True, help="student model folder (the merged stage-1 checkpoint)")
    a("--teacher", default=None, help="frozen teacher folder; default: a frozen copy of --student; 'live': the current student")
    a("--train-data", required=True, help="train split folder (envs.py data ... --split train)")
    a("--val-data", default=None, help="val split folder; validation is skipped without it")
    a("--out", required=True, help="run folder: log.jsonl, best/ and last/ checkpoints")
    a("--rollout", default="vllm", choices=["vllm", "hf"], help="rollout backend: in-process vLLM or HF generate")
    a("--loss", default="sampled", choices=["sampled", "full"], help="sampled: REINFORCE with A=ℓT−ℓS (reference); full: exact KL over the vocabulary")
    a("--reward-coef", type=float, default=0.0, help="adds coef*(success − batch mean) to every token's advantage")
    a("--updates-per-batch", type=int, default=1, help="optimiser steps per rollout batch (>1: clipped-ratio PPO form)")
    a("--clip-low", type=float, default=0.2, help="PPO ratio clip below 1")
    a("--clip-high", type=float, default=0.3, help="PPO ratio clip above 1")
    a("--no-teacher-plan", action="store_true", help="drop the reference-plan line from the teacher context")
    a("--batch-size", type=int, default=32, help="prompts per step, global (divisible by the number of ranks)")
    a("--micro-batch-size", type=int, default=4, help="sequences per forward/backward pass")
    a("--max-new-tokens", type=int, default=2048, help="rollout response length cap")
    a("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    a("--top-p", type=float, default=1.0, help="rollout nucleus sampling")
    a("--lr", type=float, default=1e-6, help="AdamW learning rate (constant)")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    a("--beta1", type=float, default=0.9, help="AdamW beta1")
    a("--beta2", type=float, default=0.999, help="AdamW beta2")
    a("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip")
    a("--epochs", type=int, default=5, help="passes over the train split")
    a("--max-steps", type=int, default=0, help="stop after this many steps (0: run all epochs)")
    a("--bf16-master", action="store_true", help="keep weights and Adam states in the model dtype (the reference's bf16), no fp32 master copy")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="model dtype; auto: bf16 on GPU, fp32 on CPU")
    a("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank on the language model instead of all weights")
    a("--freeze-vision", action="store_true", help="do not train the vision tower and merger")
    a("--fsdp", action="store_true", help="shard with fully_shard (not implemented in this version)")
    a("--kl-chunk", type=int, default=256, help="--loss full: positions per chunk of the vocabulary-wide KL")
    a("--val-every", type=int, default=20, help="validate and save every N steps (and after the last step)")
    a("--val-size", type=int, default=0, help="validate on the first N val instances (0: all)")
    a("--val-temperature", type=float, default=0.6, help="validation sampling temperature")
    a("--val-top-p", type=float, default=0.95, help="validation nucleus sampling")
    a("--max-model-len", type=int, default=8192, help="vLLM context length (prompt + response)")
    a("--vllm-kv-cache-mb", type=int, default=256, help="vLLM KV cache size on CPU")
    a("--vllm-gpu-memory", type=float, default=0.3, help="vLLM share of GPU memory (the trainer shares the GPU)")
    a("--resume", action="store_true", help="continue from OUT/last (model, optimiser, data position)")
    a("--seed", type=int, default=0, help="seed of data order and sampling")
    args = p.parse_args(argv)
    if args.fsdp:
        p.error("--fsdp is not implemented in this version (see the module docstring)")
    if args.updates_per_batch < 1 or args.batch_size < 1 or args.micro_batch_size < 1:
        p.error("--updates-per-batch, --batch-size and --micro-batch-size must be >= 1")
    return args


# ------------------------------------------------------------------------------------------
# Losses (ALGO LOGIC). logprobs/advantages/mask: [B, R] over response tokens; n_tokens = the
# number of response tokens in the *global* batch, so that summing gradients over ranks gives
# the global token mean.


def sampled_loss(logprobs, advantages, mask, n_tokens, old_logprobs=None, clip_low=0.2, clip_high=0.3):
    """Reverse KL at position t, on the student's own prefix: KL_t = Σ_v p_θ(v) (log p_θ(v) − log p_T(v)).
    Score-function identity (Σ_v p_θ ∇log p_θ = 0):  ∇KL_t = E_{y~p_θ}[(ℓ_S(y) − ℓ_T(y)) ∇ℓ_θ(y)].
    So with the detached advantage A = ℓ_T − ℓ_S of the sampled token:
        loss = −Σ_t m_t · A_t · ℓ_θ,t / N                  (REINFORCE, the reference's objective)
    Back-propagating ℓ_S − ℓ_T itself would be wrong: E[∇ℓ_θ(y)] = 0.
    With old_logprobs (several updates per batch), the PPO form with r = exp(ℓ_θ − ℓ_old):
        loss = −Σ_t m_t · min(r A, clip(r, 1 − ε_low, 1 + ε_high) A) / N,   same gradient at r = 1."""
    if old_logprobs is None:
        per_token = -advantages.detach() * logprobs
    else:
        ratio = torch.exp(logprobs - old_logprobs.detach())
        clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
        per_token = -torch.minimum(ratio * advantages.detach(), clipped * advantages.detach())
    return (per_token * mask).sum() / n_tokens


def _kl_chunk(student_hidden, teacher_hidden, student_head, teacher_head, tokens):
    log_p = F.log_softmax(student_head(student_hidden).float(), -1)
    with torch.no_grad():
        log_q = F.log_softmax(teacher_head(teacher_hidden).float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    picked = tokens.unsqueeze(-1)
    return kl, log_p.detach().gather(-1, picked).squeeze(-1), log_q.gather(-1, picked).squeeze(-1)


def full_reverse_kl(student_hidden, student_head, teacher_hidden, teacher_head, tokens, mask, n_tokens, chunk=256):
    """Exact Σ_t m_t Σ_v p_S(v)(log p_S(v) − log p_T(v)) / N from last hidden states [B, R, H]
    and the two output heads. Logits exist for `chunk` positions at a time and are recomputed
    in the backward pass (checkpoint), so memory is O(chunk × vocab), not O(R × vocab).
    Returns (loss, ℓ_S, ℓ_T of the sampled tokens, detached, [B, R])."""
    keep = mask.reshape(-1).bool()
    hs, ht = student_hidden.reshape(-1, student_hidden.shape[-1])[keep], teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[keep]
    ids = tokens.reshape(-1)[keep]
    total, lp_s, lp_t = 0.0, [], []
    for i in range(0, len(ids), chunk):
        kl, s, t = checkpoint(_kl_chunk, hs[i:i + chunk], ht[i:i + chunk], student_head, teacher_head, ids[i:i + chunk],
                              use_reentrant=False)
        total, lp_s, lp_t = total + kl, lp_s + [s], lp_t + [t]
    student_lp, teacher_lp = (torch.zeros(mask.shape, device=mask.device).masked_scatter(mask.bool(), torch.cat(x))
                              for x in (lp_s or [torch.zeros(0)], lp_t or [torch.zeros(0)]))
    return total / n_tokens, student_lp, teacher_lp


def response_hidden(model, prompt_batch, response_ids, response_mask):
    """Last hidden states at positions [P-1, P+R-1) of [left-padded prompt | response]: the
    states that predict the response tokens (the layout of common.response_logprobs)."""
    P, R = prompt_batch["input_ids"].shape[1], response_ids.shape[1]
    response_mask = response_mask.to(prompt_batch["attention_mask"].dtype)
    extra = {k: v for k, v in prompt_batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out = common.unwrap(model).model(
        input_ids=torch.cat([prompt_batch["input_ids"], response_ids.masked_fill(response_mask == 0, 0)], 1),
        attention_mask=torch.cat([prompt_batch["attention_mask"], response_mask], 1),
        mm_token_type_ids=torch.cat([prompt_batch["mm_token_type_ids"], torch.zeros_like(response_ids)], 1),
        use_cache=False, **extra)
    return out.last_hidden_state[:, P - 1:P + R - 1]


# ------------------------------------------------------------------------------------------
# Optimiser: AdamW on fp32 master copies of the trainable weights.


class MasterAdamW:
    """AdamW whose weights and states live in fp32 even when the model runs in bf16: gradients
    are copied up, the step is taken on the master copy, and the result is rounded into the
    model. With bf16_master (the reference) AdamW updates the model's own tensors instead."""

    def __init__(self, params, lr, betas, weight_decay, bf16_master=False):
        self.params = [p for p in params if p.requires_grad]
        self.master = [p if (bf16_master or p.dtype == torch.float32) else p.detach().float().clone().requires_grad_()
                       for p in self.params]
        self.opt = torch.optim.AdamW(self.master, lr=lr, betas=betas, weight_decay=weight_decay)

    def step(self, max_grad_norm):
        for p, m in zip(self.params, self.master):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.master, max_grad_norm)
        self.opt.step()
        with torch.no_grad():
            for p, m in zip(self.params, self.master):
                if m is not p:
                    p.copy_(m)
        self.zero_grad()
        return grad_norm.item()

    def zero_grad(self):
        for t in self.params + self.master:
            t.grad = None

    def state_dict(self):
        return {"opt": self.opt.state_dict(), "master": [m.detach().clone() for m in self.master]}

    def load_state_dict(self, state):
        self.opt.load_state_dict(state["opt"])
        with torch.no_grad():
            for p, m, saved in zip(self.params, self.master, state["master"]):
                m.copy_(saved)
                p.copy_(saved)


def all_reduce_grads(params, world_size):
    """Sum gradients over ranks (the losses are already divided by the global token count)."""
    if world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()
