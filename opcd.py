"""Stage 2 of MGSD: on-policy context distillation (OPCD), one file, plain PyTorch (docs/method.md §8).

Every step (opcd_step), on a batch of training instances mixed over tasks and levels:
  1. Rollout: the student sees the task *image* and samples one response per prompt (T 1.0, top-p 1.0).
  2. Teacher: the frozen base reads the privileged *symbolic state* as text (and the reference plan) and
     scores the student's exact response ids: ℓ_T = log π_T(y_t | text, y<t).
  3. Loss: the per-token reverse KL(π_S(·|image, y<t) ‖ π_T(·|text, y<t)) on the student's own prefixes, as
     REINFORCE with A_t = ℓ_T − ℓ_S (the reference) or exactly over the vocabulary (--loss full).
  4. Step: AdamW (lr 1e-6, wd 0.01), grad-norm clip 1.0, fp32 master weights (--master).
Validation (T 0.6, top-p 0.95) keeps the best/ checkpoint by macro success; best/ and last/ are HF folders;
done.json marks a finished run. Deviations from the reference (docs/method.md §10): fp32 master weights, one
all-reduce of the gradients (or FSDP2), the teacher in the trainer, log-probs recomputed by the trainer,
randomness seeded from (--seed, step, rank) so that --resume is exact. Memory: README, "What fits on one GPU".

    python opcd.py --model models/small-sft --teacher models/small --data data/plan-train --val-data data/plan-val \
        --out runs/opcd-small --batch-size 8 --max-new-tokens 128 --max-steps 40
    torchrun --nproc_per_node=8 opcd.py --model models/sft-4b --teacher Qwen/Qwen3-VL-4B-Instruct \
        --data data/plan-train --val-data data/plan-val --out runs/opcd-4b    # --rollout hf without vLLM
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import envs
from mgsd import chat_api, cli, common, lora, splits, tracking
from mgsd.optim import MasterAdamW, all_reduce_grads, global_sum, rank_checksums, shard_model


def parse_args(argv=None):
    p = cli.Parser(prog="opcd.py", description="MGSD stage 2: on-policy context distillation (OPCD)")
    a = p.add_argument
    a("--model", required=True, help="the student: a model folder or hub id (the merged stage-1 checkpoint)")
    a("--teacher", required=True, help="the frozen teacher: the base the student started from; 'live': the student itself; "
      "'none': no teacher, RL on the success reward alone (--reward-coef > 0, --loss sampled)")
    a("--data", required=True, help="train split folder (envs.py data ... --split train)")
    a("--val-data", default=None, help="val split folder; validation is skipped without it")
    a("--out", required=True, help="run folder: log.jsonl, best/ and last/ checkpoints")
    a("--rollout", default="vllm", choices=["vllm", "hf"], help="rollout backend: in-process vLLM or HF generate")
    a("--hf-cache", default="dynamic", choices=["dynamic", "static"],
      help="--rollout hf: HF's KV cache; static preallocates it and compiles the decoding step on GPU")
    a("--loss", default="sampled", choices=["sampled", "full", "topk"], help="sampled: REINFORCE with A=ℓT−ℓS (reference); "
      "full: exact KL over the vocabulary; topk: exact KL over the teacher's top --topk tokens and one bucket for the rest")
    a("--topk", type=cli.positive_int, default=20, help="--loss topk: teacher tokens kept per position (a served teacher "
      "needs vllm serve --max-logprobs >= K)")
    a("--teacher-url", type=cli.http_url, default=None, help="a vLLM server (vllm serve --teacher ...) that scores the responses: no teacher "
      "is loaded here; its prompt log-probs are of T 1, so --temperature must be 1; --loss sampled or topk")
    a("--teacher-retries", type=cli.nonneg_int, default=4, help="--teacher-url: retries of a failed request (back-off 1, 2, "
      "4, ... s) before the run stops")
    a("--teacher-timeout-seconds", type=cli.timeout_seconds, default=600.0, help="--teacher-url: the most one request may take")
    a("--reward-coef", type=cli.nonneg_float, default=0.0, help="adds coef times the success advantage to every token's "
      "advantage: success − the batch mean, or, with --samples-per-prompt > 1, normalised within each prompt's samples")
    a("--samples-per-prompt", type=cli.positive_int, default=1, help="responses sampled per prompt; > 1: each prompt's "
      "group is the baseline of the success reward (GRPO: (r − group mean) / (group std + 1e-4))")
    a("--updates-per-batch", type=cli.positive_int, default=1, help="optimiser steps per rollout batch (>1: clipped-ratio PPO form)")
    a("--clip-low", type=cli.nonneg_float, default=0.2, help="PPO ratio clip below 1")
    a("--clip-high", type=cli.nonneg_float, default=0.3, help="PPO ratio clip above 1")
    a("--no-teacher-plan", action="store_true", help="drop the reference-plan line from the teacher context")
    a("--teacher-context", default="privileged", choices=["privileged", "image"],
      help="privileged: the teacher reads the state as text (MGSD); image: the student's prompt (ablation)")
    a("--image-prompt", default="recap", choices=["recap", "direct"], help="the student's image prompt: recap (the "
      "method's format) or direct (answer-only, for students trained on planning-direct rows)")
    a("--text-share", type=cli.fraction, default=0.0, help="share of each batch's prompts in which the student reads the "
      "state as text, a rehearsal of text planning (0: the method as published)")
    a("--batch-size", type=cli.positive_int, default=32, help="prompts per step, global (divisible by the number of ranks)")
    a("--micro-batch-size", type=cli.positive_int, default=4, help="sequences per forward/backward pass")
    a("--max-new-tokens", type=cli.positive_int, default=2048, help="rollout response length cap")
    a("--temperature", type=cli.positive_float, default=1.0, help="rollout sampling temperature")
    a("--top-p", type=cli.probability, default=1.0, help="rollout nucleus sampling, in (0, 1]")
    a("--lr", type=cli.learning_rate, default=1e-6, help="AdamW learning rate (constant), at most 1")
    a("--weight-decay", type=cli.nonneg_float, default=0.01, help="AdamW weight decay")
    a("--betas", type=cli.beta, nargs=2, default=(0.9, 0.999), help="AdamW betas, each in [0, 1)")
    a("--max-grad-norm", type=cli.nonneg_float, default=1.0, help="gradient-norm clip (0: off)")
    a("--epochs", type=cli.epochs, default=5, help="passes over the train split")
    a("--max-steps", type=cli.nonneg_int, default=0, help="stop after this many steps (0: run all epochs)")
    a("--master", default="fp32", choices=["fp32", "stochastic", "bf16"], help="fp32: master weights and moments "
      "(16 B/param); stochastic: bf16 weights rounded stochastically, fp32 moments (8 B/param); bf16: the reference's "
      "plain bf16 AdamW, whose 1e-6 steps round away")
    a("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="model dtype; auto: bf16 on GPU, fp32 on CPU")
    a("--lora-rank", type=cli.rank, default=0, help="train LoRA adapters of this rank on the language model instead of all weights (0: none)")
    a("--freeze-vision", action="store_true", help="do not train the vision tower and merger")
    a("--fsdp", action="store_true", help="shard the student and optimiser states over the ranks (FSDP2 fully_shard)")
    a("--kl-chunk", type=cli.positive_int, default=256, help="--loss full: positions per chunk of the vocabulary-wide KL")
    a("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
      help="non-reentrant gradient checkpointing of the decoder layers and vision blocks (tiny models: faster without)")
    a("--val-every", type=cli.positive_int, default=20, help="validate and save every N steps (and after the last step)")
    a("--save-every", type=cli.nonneg_int, default=0, help="also save last/ every N steps between validations (0: off)")
    a("--val-size", type=cli.nonneg_int, default=0, help="validate on the first N val instances (0: all)")
    a("--val-temperature", type=cli.positive_float, default=0.6, help="validation sampling temperature")
    a("--val-top-p", type=cli.probability, default=0.95, help="validation nucleus sampling, in (0, 1]")
    a("--max-model-len", type=cli.positive_int, default=8192, help="vLLM context length (prompt + response)")
    a("--vllm-kv-cache-mb", type=cli.positive_int, default=256, help="vLLM KV cache size on CPU")
    a("--vllm-gpu-memory", type=cli.positive_float, default=0.3, help="vLLM share of GPU memory (the trainer shares the GPU)")
    a("--resume", action="store_true", help="continue from OUT/last (model, optimiser, data position; same settings)")
    a("--overwrite", action="store_true", help="replace an --out that already holds a run")
    a("--report-to", default="none", choices=tracking.CHOICES, help="also send log.jsonl's numbers to this tracker")
    a("--seed", type=cli.seed, default=0, help="seed of data order and sampling")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Losses (ALGO LOGIC). logprobs/advantages/mask: [B, R] over response tokens; n_tokens = the
# number of response tokens in the *global* batch, so that summing gradients over ranks gives
# the global token mean.


def sampled_loss(logprobs, advantages, mask, n_tokens, old_logprobs=None, clip_low=0.2, clip_high=0.3):
    """REINFORCE on the sampled tokens, −Σ_t m_t · A_t · ℓ_θ,t / N (the math is at its call in opcd_step).
    With old_logprobs (several updates per batch), the PPO form with r = exp(ℓ_θ − ℓ_old):
        loss = −Σ_t m_t · min(r A, clip(r, 1 − ε_low, 1 + ε_high) A) / N,   same gradient at r = 1."""
    if old_logprobs is None:
        per_token = -advantages.detach() * logprobs
    else:
        ratio = torch.exp(logprobs - old_logprobs.detach())
        clipped = ratio.clamp(1 - clip_low, 1 + clip_high)
        per_token = -torch.minimum(ratio * advantages.detach(), clipped * advantages.detach())
    return (per_token * mask).sum() / n_tokens


def _kl_chunk(student_hidden, teacher_hidden, student_head, teacher_head, tokens, temperature):
    log_p = F.log_softmax(student_head(student_hidden).float() / temperature, -1)
    with torch.no_grad():
        log_q = F.log_softmax(teacher_head(teacher_hidden).float() / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    picked = tokens.unsqueeze(-1)
    return kl, log_p.detach().gather(-1, picked).squeeze(-1), log_q.gather(-1, picked).squeeze(-1)


def full_reverse_kl(student_hidden, student_head, teacher_hidden, teacher_head, tokens, mask, n_tokens, chunk=256,
                    temperature=1.0):
    """Exact Σ_t m_t Σ_v p_S(v)(log p_S(v) − log p_T(v)) / N from last hidden states [B, R, H]
    and the two output heads. Logits exist for `chunk` positions at a time and are recomputed
    in the backward pass (checkpoint), so memory is O(chunk × vocab), not O(R × vocab).
    Both distributions are those of logits / temperature (the rollout's). Returns (loss, ℓ_S, ℓ_T of
    the sampled tokens, detached, [B, R])."""
    keep = mask.reshape(-1).bool()
    hs, ht = student_hidden.reshape(-1, student_hidden.shape[-1])[keep], teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[keep]
    ids = tokens.reshape(-1)[keep]
    total, lp_s, lp_t = 0.0, [], []
    for i in range(0, len(ids), chunk):
        kl, s, t = checkpoint(_kl_chunk, hs[i:i + chunk], ht[i:i + chunk], student_head, teacher_head, ids[i:i + chunk],
                              temperature, use_reentrant=False)
        total, lp_s, lp_t = total + kl, lp_s + [s], lp_t + [t]
    student_lp, teacher_lp = (torch.zeros(mask.shape, device=mask.device).masked_scatter(mask.bool(), torch.cat(x))
                              for x in (lp_s or [torch.zeros(0)], lp_t or [torch.zeros(0)]))
    return total / n_tokens, student_lp, teacher_lp


def _topk_chunk(student_hidden, student_head, top_ids, top_logprobs, teacher_tail, tokens, temperature):
    log_p = F.log_softmax(student_head(student_hidden).float() / temperature, -1)
    log_p_top = log_p.gather(-1, top_ids)  # tail: a log-sum-exp (1 − Σ_top p rounds to 0); K = V: e^-1000, term 0
    log_p_tail = log_p.scatter(-1, top_ids, float("-inf")).logsumexp(-1).clamp(min=-1000.0)
    log_q_tail = teacher_tail.clamp(min=-1000.0)
    kl = (log_p_top.exp() * (log_p_top - top_logprobs)).sum() + (log_p_tail.exp() * (log_p_tail - log_q_tail)).sum()
    return kl, log_p.detach().gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def topk_reverse_kl(student_hidden, student_head, top_ids, top_logprobs, teacher_tail, tokens, mask, n_tokens, chunk=256,
                    temperature=1.0):
    """The reverse KL of the two distributions coarsened to the teacher's top-K tokens S_t plus one bucket for the
    rest, p(tail) = Σ_{v∉S_t} p(v):
        Σ_t m_t [Σ_{v∈S_t} p_S(v)(log p_S(v) − log p_T(v)) + p_S(tail)(log p_S(tail) − log p_T(tail))] / N,
    never above the full KL (coarsening never adds divergence), equal to it at K = vocabulary. The teacher side is
    its top-K ids and log-probs [B, R, K] and log p_T(tail) [B, R] (common.teacher_topk or served_teacher_scores);
    the student's tail is exact in fp32 however small. The student's logits exist `chunk` positions at a time.
    Returns (loss, ℓ_S of the sampled tokens, detached, [B, R])."""
    keep = mask.bool()
    hs, ids, lp, tail = student_hidden[keep], top_ids[keep], top_logprobs[keep], teacher_tail[keep]
    total, picked = 0.0, []
    for i in range(0, len(hs), chunk):
        kl, s = checkpoint(_topk_chunk, hs[i:i + chunk], student_head, ids[i:i + chunk], lp[i:i + chunk],
                           tail[i:i + chunk], tokens[keep][i:i + chunk], temperature, use_reentrant=False)
        total, picked = total + kl, picked + [s]
    student_lp = torch.zeros(mask.shape, device=mask.device).masked_scatter(keep, torch.cat(picked or [torch.zeros(0)]))
    return total / n_tokens, student_lp


# ------------------------------------------------------------------------------------------
# Data, rollouts, batches


def student_turns(rows, text_share=0.0, direct=False):
    """The student's prompts: the image prompt, or, for the last `text_share` of the rows, the state as text
    (--text-share: the student keeps rehearsing text planning against the same teacher)."""
    first_text = len(rows) - round(text_share * len(rows))
    return [envs.student_messages(r["state"], r["image"], direct) if i < first_text
            else envs.text_student_messages(r["state"]) for i, r in enumerate(rows)]


def group_advantages(success, group_size):
    """GRPO's advantage per response [N], groups of `group_size` consecutive samples of one prompt:
    (r − group mean) / (group std + 1e-4); 0 where every sample of a prompt scored alike."""
    groups = success.view(-1, group_size)
    return ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)


def teacher_prompts(args, processor, rows, student_in, device):
    """The frozen teacher's prompts, encoded: the privileged state as text (and the reference plan); None with
    --teacher none."""
    if args.teacher == "none":  # RL on the success reward alone
        return None
    if args.teacher_context == "image":  # ablation: the teacher knows no more than the student
        return student_in
    return common.encode_prompts(processor, [envs.teacher_messages(r["state"], with_plan=not args.no_teacher_plan)
                                             for r in rows], device)


@torch.no_grad()
def teacher_scores(args, teacher, teacher_in, resp, micro):
    """What the loss needs of the frozen teacher per micro-batch, reading its prompt then the student's exact response
    ids: ℓ_T [B, R] (sampled), its last hidden states (full), ℓ_T + top-k ids, log-probs and tail (topk); or None."""
    if teacher_in is None:
        return [None] * len(micro)
    T, out = args.temperature, []  # log-probs are those of logits / T, the distribution that was sampled
    for ix, (ids, mask) in zip(micro, resp):
        prompts = common.take_prompts(teacher_in, ix)
        if args.teacher_url:  # from the server, for the same prompt and response ids
            out.append(common.served_teacher_scores(teacher, prompts, ids, mask, args.topk if args.loss == "topk" else 0))
        elif args.loss == "sampled":
            out.append(common.response_logprobs(teacher, prompts, ids, mask, T))
        else:
            hidden = common.response_hidden(teacher, prompts, ids, mask)
            out.append(hidden if args.loss == "full" else
                       common.teacher_topk(hidden, teacher.lm_head, ids, mask, args.topk, args.kl_chunk, T))
    return out


def micro_loss(args, model, teacher, student_in, ids, mask, teacher_out, reward_adv, n_tokens, old=None):
    """One micro-batch's share of the loss: (loss, ℓ_S and ℓ_T of the sampled tokens [B, R], detached)."""
    T = args.temperature
    if args.loss == "sampled":
        # The reverse KL at t on the student's own prefix, KL_t = Σ_v p_θ(v)(log p_θ(v) − log p_T(v)), has
        # ∇KL_t = E_{y~p_θ}[(ℓ_θ(y) − ℓ_T(y)) ∇ℓ_θ(y)] (score function: Σ_v p_θ ∇log p_θ = 0). So one sampled
        # token gives REINFORCE with the *detached* advantage A_t = ℓ_T − ℓ_S; back-propagating ℓ_S − ℓ_T
        # itself would be wrong (E[∇ℓ_θ(y)] = 0).
        logprobs = common.response_logprobs(model, student_in, ids, mask, T)
        student_lp = logprobs.detach() if old is None else old
        teacher_lp = student_lp if teacher_out is None else teacher_out  # no teacher: the reward alone
        advantages = teacher_lp - student_lp + reward_adv.unsqueeze(1)  # A_t = ℓ_T − ℓ_S (+ reward)
        loss = sampled_loss(logprobs, advantages, mask, n_tokens, old, args.clip_low, args.clip_high)
        return loss, student_lp, teacher_lp
    hidden = common.response_hidden(model, student_in, ids, mask)
    if args.loss == "topk":  # the KL over the teacher's top K + one bucket
        teacher_lp, top_ids, top_logprobs, teacher_tail = teacher_out
        loss, student_lp = topk_reverse_kl(hidden, model.lm_head, top_ids, top_logprobs, teacher_tail, ids, mask, n_tokens,
                                           args.kl_chunk, T)
        return loss, student_lp, teacher_lp
    return full_reverse_kl(hidden, model.lm_head, teacher_out, teacher.lm_head, ids, mask, n_tokens, args.kl_chunk, T)


# ------------------------------------------------------------------------------------------
# One OPCD step: rollout -> teacher -> loss -> optimiser step (ALGO LOGIC)


def opcd_step(args, step, rows, model, teacher, llm, processor, opt, world_size, device):
    k = args.samples_per_prompt  # each prompt's samples are consecutive: a group
    student_msgs = [m for m in student_turns(rows, args.text_share, args.image_prompt == "direct") for _ in range(k)]
    rows = [r for r in rows for _ in range(k)]
    rank, n = int(os.environ.get("RANK", 0)), len(rows)
    times = [time.time()]
    # 1. Rollout: the student sees the image and samples --samples-per-prompt responses per prompt.
    student_all = common.encode_prompts(processor, student_msgs, device)  # once: the HF rollout and the loss read it
    seeds = [common.sample_seed(args.seed, step, rank, i) for i in range(n)]
    responses = common.sample_responses(args.rollout, model, llm, processor, student_msgs, args.max_new_tokens,
                                        args.temperature, args.top_p, seeds, args.hf_cache, student_all)
    if llm is not None:
        common.llm_sleep(llm)  # GPU: the KV cache and the engine's weights make room for training
    scores = [envs.score_planning(r["state"], o["text"]) for r, o in zip(rows, responses)]
    teacher_all = teacher_prompts(args, processor, rows, student_all, device)
    tokens = (student_all["attention_mask"].sum(1) + torch.tensor([2 * len(o["token_ids"]) for o in responses], device=device)
              + (0 if teacher_all is None else teacher_all["attention_mask"].sum(1)))  # both sequences' tokens
    # Picture prompts first: every rank runs the vision tower in the same micro-batches (FSDP's lockstep).
    micro = common.micro_batches(list(zip((student_all["mm_token_type_ids"] == 0).all(1).tolist(), tokens.tolist())),
                          args.micro_batch_size)
    resp = [common.pad_responses([responses[i] for i in ix], processor.tokenizer.pad_token_id, device) for ix in micro]
    student_in = [common.take_prompts(student_all, ix) for ix in micro]
    times.append(time.time())
    # 2. Teacher: the privileged state as text + the student's exact response ids; frozen.
    teacher_out = teacher_scores(args, teacher, teacher_all, resp, micro)
    times.append(time.time())
    # 3. Loss: per-token reverse KL on the student's own tokens, token mean over the global batch.
    n_tokens, mean_success = global_sum([sum(m.sum().item() for _, m in resp), sum(s["success"] for s in scores)], device)
    mean_success /= args.batch_size * k
    success = torch.tensor([float(s["success"]) for s in scores], device=device)
    if k == 1:  # the baseline is the global batch's mean; a group lies within one rank
        reward_adv = args.reward_coef * (success - mean_success)
    else:
        reward_adv = args.reward_coef * group_advantages(success, k)
    old = [None] * len(micro)
    if args.updates_per_batch > 1:  # the PPO form needs ℓ_old of the sampling policy
        with torch.no_grad():
            old = [common.response_logprobs(model, s, ids, mask, args.temperature)
                   for s, (ids, mask) in zip(student_in, resp)]
    kl_sum, loss_sum, student_lps, grad_norms = 0.0, 0.0, [None] * n, []
    for update in range(args.updates_per_batch):
        for j, ix in enumerate(micro):
            ids, mask = resp[j]
            loss, student_lp, teacher_lp = micro_loss(args, model, teacher, student_in[j], ids, mask, teacher_out[j],
                                                      reward_adv[ix], n_tokens, old[j])
            loss.backward()
            if update == 0:
                kl_sum, loss_sum = kl_sum + ((student_lp - teacher_lp) * mask).sum().item(), loss_sum + loss.item()
                for i, lp in zip(ix, student_lp.cpu()):  # in the responses' order
                    student_lps[i] = lp
        # 4. Step: sum gradients over ranks (FSDP already did), clip, AdamW on fp32 master weights.
        all_reduce_grads(opt.params, 1 if args.fsdp else world_size)
        grad_norms.append(opt.step(args.max_grad_norm))
    if llm is not None:
        common.push_weights(llm, model)  # the next rollout samples from the updated student
    times.append(time.time())
    stats = dict(kl_sum=kl_sum, loss_sum=loss_sum, n_tokens=n_tokens, success=mean_success, grad_norm=grad_norms[0])
    return common.step_log(args, step, responses, scores, student_lps, stats, times, device)


# ------------------------------------------------------------------------------------------
# The run (validation: common.validate)


# Settings that may change when a run is resumed; any other difference is refused.
RESUMABLE = {"resume", "overwrite", "max_steps", "val_every", "save_every", "val_size", "val_data", "max_model_len",
             "vllm_kv_cache_mb", "vllm_gpu_memory", "hf_cache", "teacher_url", "teacher_retries",
             "teacher_timeout_seconds", "data_sha256", "report_to"}  # data_sha256: cli.check_data


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    state_file = out / "last" / "trainer_state.pt"
    cli.check_out(out, args.resume, args.overwrite, [args.model, args.teacher, args.data, args.val_data], "opcd.py")
    if args.resume:
        for folder in ("last", "best"):
            cli.recover_dir(out / folder)
        if not state_file.is_file():
            cli.fail(f"--resume: no {state_file}")
        cli.check_resume(cli.saved_args(out / "args.json"), args, RESUMABLE)
    cli.check_opcd_options(args)
    tracking.check_installed(args.report_to)
    if args.rollout == "vllm" and not common.vllm_available():
        cli.fail("--rollout vllm: vllm is not installed (use --rollout hf)")
    ddp, rank, local_rank, world_size, device = common.compute_init(args.seed)
    if args.batch_size % world_size:
        cli.fail(f"--batch-size {args.batch_size} is not divisible by the {world_size} ranks")
    try:
        train_rows = splits.load_split(args.data, kinds=["planning"])
        args.data_sha256 = splits.fingerprint([args.data])
        cli.check_data(out, args)
        val_rows = splits.load_split(args.val_data, kinds=["planning"]) if args.val_data else []
        if len(train_rows) < args.batch_size:
            raise ValueError(f"{args.data}: {len(train_rows)} planning rows, fewer than --batch-size {args.batch_size}")
        for path in [args.model] + ([] if args.teacher in ("live", "none") or args.teacher_url else [args.teacher]):
            common.check_model_dir(path)
        dtype = getattr(torch, args.dtype if args.dtype != "auto" else "bfloat16" if device.type == "cuda" else "float32")
        model, processor = common.load_model(args.model, device, dtype)
        context = model.config.get_text_config().max_position_embeddings
        if args.max_new_tokens > context:  # a budget past the context would run for nothing
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} exceeds the model's context of {context} tokens")
        teacher = model if args.teacher == "live" else None if args.teacher == "none" else common.load_teacher(
            args.teacher, processor, device, dtype, args.teacher_url, args.teacher_retries,
            probe=processor.apply_chat_template(envs.teacher_messages(train_rows[0]["state"]), tokenize=False,
                                                add_generation_prompt=True) + envs.reference_response(train_rows[0]["state"]),
            vocab_size=model.lm_head.out_features, timeout_seconds=args.teacher_timeout_seconds)
    except (ValueError, FileNotFoundError, chat_api.EndpointError) as e:
        cli.fail(str(e).splitlines()[0])
    val_rows = val_rows[:args.val_size] if args.val_size else val_rows
    if args.val_data and Path(args.val_data).resolve() == Path(args.data).resolve() and rank == 0:
        cli.warn("--val-data is --data: the best checkpoint is chosen on training instances")
    steps_per_epoch = len(train_rows) // args.batch_size  # >= 1: checked above
    total_steps = max(1, int(args.epochs * steps_per_epoch))
    total_steps = min(args.max_steps, total_steps) if args.max_steps else total_steps
    if args.lora_rank:
        lora.add_lora(model, rank=args.lora_rank, alpha=2 * args.lora_rank)
    elif args.freeze_vision:
        model.model.visual.requires_grad_(False)
    if args.grad_checkpointing:  # activations of a layer are recomputed in the backward pass, not stored
        common.enable_checkpointing(model)
    model.train()
    if args.fsdp and ddp:
        shard_model(model)
    opt = MasterAdamW(model.parameters(), args.lr, tuple(args.betas), args.weight_decay, args.master)
    start_step, best = 0, -1.0
    if args.resume:  # trainable weights come back from the optimiser's master copy, bit-exact
        saved = opt.load(state_file, device)
        start_step, best = saved["step"], saved["best_macro_success"]
    llm = None
    if args.rollout == "vllm":
        llm = common.make_llm(args.model, seed=args.seed, max_model_len=args.max_model_len,
                              dtype=str(dtype).removeprefix("torch."), kv_cache_bytes=args.vllm_kv_cache_mb << 20,
                              gpu_memory_utilization=args.vllm_gpu_memory)
        common.push_weights(llm, model)
    if rank == 0:
        cli.claim_out(out, clear=args.overwrite and not args.resume)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")
    write_log = tracking.RunLog(out, start_step if args.resume else None, rank, args.report_to, vars(args))
    common.print0(f"OPCD: {len(train_rows)} train rows, {steps_per_epoch} steps/epoch, steps {start_step}->{total_steps}, "
                  f"{world_size} rank(s), rollout {args.rollout}, loss {args.loss}, teacher {args.teacher}")
    if start_step == 0 and val_rows:  # as the reference: validate the starting model, which may stay the best
        val = common.validate(args, -1, val_rows, model, llm, processor, rank, world_size)
        best = val["val_macro_success"]
        common.save_model(model, processor, out / "best", rank=rank)
        write_log({"step": 0, **val})

    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start_step, disable=rank != 0, desc="opcd")
    for step in range(start_step, total_steps):
        rows = common.batch_rows(train_rows, step, args.batch_size, args.seed, rank, world_size)
        log = None
        try:
            log = opcd_step(args, step, rows, model, teacher, llm, processor, opt, world_size, device)
            log["epoch"] = step // steps_per_epoch
            validate_now = (step + 1) % args.val_every == 0 or step + 1 == total_steps
            if val_rows and validate_now:  # keep the best checkpoint by macro success
                log.update(common.validate(args, step, val_rows, model, llm, processor, rank, world_size))
                if log["val_macro_success"] > best:
                    best = log["val_macro_success"]
                    common.save_model(model, processor, out / "best", rank=rank)
            save_now = validate_now or (args.save_every and (step + 1) % args.save_every == 0)
            if save_now:  # the ranks must hold identical weights
                log["rank_weight_checksums"] = rank_checksums(opt.params, world_size)
            write_log(log)  # before last/: a kill in between leaves a line past the checkpoint, which --resume drops
            if save_now:
                common.save_model(model, processor, out / "last", {"step": step + 1, "optimizer": opt.state_dict(),
                                                                   "best_macro_success": best, "args": vars(args)}, rank)
                if world_size > 1:
                    dist.barrier()
        except (chat_api.EndpointError, cli.NonFinite, OSError) as e:  # a teacher gone, a NaN, a full disk: stop here
            bar.close()
            kept = f"{out / 'last'} keeps the last good one (--resume)" if (out / "last").is_dir() else "no checkpoint yet"
            cli.fail(f"{e}; step {step + 1} was {'not taken' if log is None else 'taken but not saved'}: {kept}")
        bar.set_postfix(kl=f"{log['reverse_kl']:.3f}", success=f"{log['success']:.2f}")
        bar.update(1)
    bar.close()
    write_log.close()
    if rank == 0:  # the sign that the run is complete (best/ and last/ exist from the first validation on)
        (out / "done.json").write_text(json.dumps({"steps": total_steps, "best_val_macro_success": best}) + "\n")
    common.print0(f"done: {total_steps} steps" + (f", best val macro success {best:.3f}" if val_rows else "")
                  + f", checkpoints in {out}")
    if llm is not None:
        common.close_llm(llm)
    if ddp:  # only what compute_init set up (an in-process vLLM engine owns its own group)
        common.compute_cleanup()


if __name__ == "__main__":
    cli.interruptible(main, "--resume continues from the last checkpoint (OUT/last)")
