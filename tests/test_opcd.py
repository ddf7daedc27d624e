"""OPCD (opcd.py): the estimator, the alignment of student and teacher tokens, vLLM rollouts
and weight pushes, the script end to end under torchrun, and that the student learns."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import envs
import opcd
from mgsd import common, optim, splits

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# The estimator, on a toy categorical policy p = softmax(θ) and a fixed teacher q.


def toy_policy(vocab=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(vocab, generator=g).requires_grad_()
    teacher_logits = 2.0 * torch.randn(vocab, generator=g)
    return theta, teacher_logits


def exact_reverse_kl_grad(theta, teacher_logits):
    """∇_θ KL(softmax θ ‖ softmax q) = p ⊙ (log p − log q − KL), derived by hand."""
    log_p, log_q = F.log_softmax(theta.detach(), -1), F.log_softmax(teacher_logits, -1)
    p = log_p.exp()
    kl = (p * (log_p - log_q)).sum()
    return p * (log_p - log_q - kl)


def sample_tokens(theta, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(F.softmax(theta.detach(), -1), n, replacement=True, generator=g)


def test_sampled_token_reinforce_gradient_matches_exact_reverse_kl_gradient():
    theta, teacher_logits = toy_policy()
    n = 40000
    tokens = sample_tokens(theta, n)
    student_lp = F.log_softmax(theta, -1)[tokens].unsqueeze(1)  # [n, 1]: n sequences of one token
    teacher_lp = F.log_softmax(teacher_logits, -1)[tokens].unsqueeze(1)
    advantages = teacher_lp - student_lp.detach()
    loss = opcd.sampled_loss(student_lp, advantages, torch.ones(n, 1), n_tokens=n)
    (grad,) = torch.autograd.grad(loss, theta)
    exact = exact_reverse_kl_grad(theta, teacher_logits)
    assert F.cosine_similarity(grad, exact, dim=0) > 0.99
    assert torch.allclose(grad.norm(), exact.norm(), rtol=0.1)


def test_full_loss_gives_the_exact_reverse_kl_gradient_and_value():
    theta, teacher_logits = toy_policy()
    R = 5  # the same distribution at five positions, chunked two at a time
    hidden = theta.expand(1, R, -1)
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])
    tokens = torch.zeros(1, R, dtype=torch.long)
    loss, _, _ = opcd.full_reverse_kl(hidden, torch.nn.Identity(), teacher_logits.expand(1, R, -1),
                                      torch.nn.Identity(), tokens, mask, n_tokens=4, chunk=2)
    (grad,) = torch.autograd.grad(loss, theta)
    log_p, log_q = F.log_softmax(theta.detach(), -1), F.log_softmax(teacher_logits, -1)
    assert torch.allclose(loss, (log_p.exp() * (log_p - log_q)).sum(), atol=1e-6)
    assert torch.allclose(grad, exact_reverse_kl_grad(theta, teacher_logits), atol=1e-6)


def test_backpropagating_the_raw_sampled_difference_has_zero_expected_gradient():
    theta, teacher_logits = toy_policy()
    n = 40000
    tokens = sample_tokens(theta, n)
    student_lp = F.log_softmax(theta, -1)[tokens]
    teacher_lp = F.log_softmax(teacher_logits, -1)[tokens]
    (grad,) = torch.autograd.grad((student_lp - teacher_lp).mean(), theta)
    exact = exact_reverse_kl_grad(theta, teacher_logits)
    assert grad.norm() < 0.05 * exact.norm()  # the pitfall: an unbiased estimate of KL, but not of ∇KL


def test_clipped_ratio_form_equals_reinforce_at_ratio_one_and_stops_outside_the_clip():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    advantages, mask = torch.tensor([[0.5, -1.0, 2.0]]), torch.ones(1, 3)
    (g_reinforce,) = torch.autograd.grad(opcd.sampled_loss(logprobs, advantages, mask, 3), logprobs)
    (g_ppo,) = torch.autograd.grad(opcd.sampled_loss(logprobs, advantages, mask, 3, old_logprobs=logprobs.detach()),
                                   logprobs)
    assert torch.allclose(g_ppo, g_reinforce) and torch.allclose(g_reinforce, -advantages / 3)
    # ratio e^0.5 = 1.65 > 1.3 with A > 0, ratio e^-0.5 = 0.61 < 0.8 with A < 0: both clipped, no gradient;
    # ratio 1.1 with A > 0 is inside the clip range: gradient A * r / N.
    old = logprobs.detach() - torch.tensor([[0.5, -0.5, 0.0953]])
    (g,) = torch.autograd.grad(opcd.sampled_loss(logprobs, advantages, mask, 3, old_logprobs=old), logprobs)
    assert g[0, 0] == 0 and g[0, 1] == 0 and torch.isclose(g[0, 2], torch.tensor(-2.0 * 1.1 / 3), atol=1e-3)


def test_fp32_and_stochastic_masters_keep_updates_that_bf16_weights_round_away():
    results = {}
    for master in ("fp32", "stochastic", "bf16"):
        w = torch.nn.Parameter(torch.full((1000,), 1.0, dtype=torch.bfloat16))
        opt = optim.MasterAdamW([w], lr=1e-6, betas=(0.9, 0.999), weight_decay=0.0, master=master)
        for _ in range(3000):  # Adam's step is ~lr per step whatever the gradient scale
            w.grad = torch.ones_like(w)
            opt.step(max_grad_norm=1e9)
        results[master] = w.float().mean().item()
    # bf16 ulp at 1.0 is 2^-7 (below) / 2^-8: a 1e-6 step is far below half of it and rounds away.
    assert results["bf16"] == 1.0
    # fp32 master: 3000 steps of ~1e-6 accumulate to ~3e-3, visible after rounding to bf16.
    assert 1.0 - 0.004 < results["fp32"] < 1.0 - 0.002
    # stochastic rounding: each weight moves one bf16 step with probability 3e-3 / 2^-8; the mean follows fp32
    assert 1.0 - 0.004 < results["stochastic"] < 1.0 - 0.002


def test_stochastic_master_moves_weights_as_fp32_masters_do_and_resumes_exactly():
    """lr 1e-6, 200 Adam steps on gradients with a mean: the fp32 master moves each weight by ~-6e-5, far
    below half a bf16 step at |w| ~ 0.05. Plain bf16 AdamW keeps almost none of it; stochastic rounding
    keeps it on average. A state saved at step 100 and loaded into a fresh optimiser continues bit-exactly."""
    torch.manual_seed(0)
    init = (torch.randn(4000) * 0.05).to(torch.bfloat16)
    grads = [(torch.randn(4000) + 0.3).to(torch.bfloat16) for _ in range(200)]

    def train(master, steps=range(200), w=None, opt=None):
        w = w if w is not None else torch.nn.Parameter(init.clone())
        opt = opt or optim.MasterAdamW([w], lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01, master=master)
        for i in steps:
            w.grad = grads[i].clone()
            opt.step(max_grad_norm=1e9)
        return w, opt

    fp32_master = train("fp32")[1].master[0].detach()
    moved = {m: (train(m)[0].detach().float() - init.float()).mean().item() for m in ("stochastic", "bf16")}
    want = (fp32_master - init.float()).mean().item()
    assert want < -4e-5
    assert abs(moved["stochastic"] - want) < 0.1 * abs(want) and abs(moved["bf16"]) < 0.1 * abs(want)
    w, opt = train("stochastic", range(100))
    w2 = torch.nn.Parameter(torch.zeros(4000, dtype=torch.bfloat16))
    opt2 = optim.MasterAdamW([w2], lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01, master="stochastic")
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(train("stochastic", range(100, 200), w2, opt2)[0], train("stochastic")[0])


# ------------------------------------------------------------------------------------------
# Alignment: the teacher scores exactly the student's tokens, at the same response positions.


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from mgsd import common

    model, processor = common.load_model(tiny_model)
    return model.eval(), processor


@pytest.fixture(scope="module")
def train_dir(make_data):
    return make_data("train", 1)


def rows_of(data_dir, n):
    return splits.load_split(data_dir, kinds=["planning"])[:n]


def plain_logprobs(model, input_ids, prompt_len, **extra):
    """Independent reference: one unpadded row, full logits, log_softmax, gather."""
    mm = torch.zeros_like(input_ids)
    if "image_grid_thw" in extra:
        mm = extra.pop("mm_token_type_ids")
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=mm, **extra).logits
    lp = torch.log_softmax(logits[0, prompt_len - 1:-1], -1)
    return lp.gather(-1, input_ids[0, prompt_len:, None])[:, 0]


def test_teacher_input_has_no_image_tokens_and_scores_the_students_exact_token_ids(tiny, train_dir):
    from mgsd import common
    import envs

    model, processor = tiny
    rows = rows_of(train_dir, 3)
    msgs = [envs.student_messages(r["state"], r["image"]) for r in rows]
    responses = common.sample_responses("hf", model, None, processor, msgs, 12, 1.0, 1.0, [0, 1, 2])
    ids, mask = common.pad_responses(responses, processor.tokenizer.pad_token_id, "cpu")
    student = common.encode_prompts(processor, msgs)
    teacher = common.encode_prompts(processor, [envs.teacher_messages(r["state"]) for r in rows])
    vision = set(common.vision_token_ids(processor))
    assert not vision & set(teacher["input_ids"].flatten().tolist()) and "pixel_values" not in teacher
    assert vision & set(student["input_ids"].flatten().tolist())
    for i, r in enumerate(responses):  # the same tensor row feeds both models: the ids, never re-tokenised
        assert ids[i, :len(r["token_ids"])].tolist() == r["token_ids"] and mask[i].sum() == len(r["token_ids"])
        assert not vision & set(r["token_ids"])
    # Both sequences are [left-padded prompt | response]: response token j sits at P + j in each.
    for batch in (student, teacher):
        full = torch.cat([batch["input_ids"], ids], 1)
        P = batch["input_ids"].shape[1]
        assert torch.equal(full[:, P:][mask.bool()], ids[mask.bool()])


def test_batched_logprobs_equal_single_row_logprobs(tiny, train_dir):
    from mgsd import common
    import envs

    model, processor = tiny
    rows = rows_of(train_dir, 3)
    responses = [dict(token_ids=list(range(40, 40 + k)) + [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")])
                 for k in (3, 9, 6)]
    ids, mask = common.pad_responses(responses, processor.tokenizer.pad_token_id, "cpu")
    for make in (lambda r: envs.student_messages(r["state"], r["image"]), lambda r: envs.teacher_messages(r["state"])):
        chats = [make(r) for r in rows]
        with torch.no_grad():
            batched = common.response_logprobs(model, common.encode_prompts(processor, chats), ids, mask)
        for i, chat in enumerate(chats):
            single = common.encode_prompts(processor, [chat])
            n = len(responses[i]["token_ids"])
            extra = {k: v for k, v in single.items() if k in ("pixel_values", "image_grid_thw")}
            if extra:
                extra["mm_token_type_ids"] = torch.cat([single["mm_token_type_ids"], torch.zeros(1, n, dtype=torch.long)], 1)
            full = torch.cat([single["input_ids"], ids[i:i + 1, :n]], 1)
            ref = plain_logprobs(model, full, single["input_ids"].shape[1], **extra)
            assert torch.allclose(batched[i, :n], ref, atol=1e-5), (batched[i, :n] - ref).abs().max()


@pytest.mark.parametrize("n", [5, 13])
def test_chunked_logprobs_equal_the_whole_log_softmax_in_value_and_gradient(n):
    """chunk 8: 5 positions are one chunk kept for the backward, 13 are two recomputed ones."""
    g = torch.Generator().manual_seed(0)
    hidden, head = torch.randn(n, 6, generator=g, requires_grad=True), torch.nn.Linear(6, 11)
    tokens = torch.randint(0, 11, (n,), generator=g)
    chunked = common.chunked_logprobs(hidden, head, tokens, chunk=8, temperature=0.7)
    grads = torch.autograd.grad((chunked * torch.arange(n)).sum(), [hidden, head.weight])
    whole = F.log_softmax(head(hidden) / 0.7, -1).gather(-1, tokens[:, None]).squeeze(-1)
    expected = torch.autograd.grad((whole * torch.arange(n)).sum(), [hidden, head.weight])
    torch.testing.assert_close(chunked, whole)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


def test_rows_taken_from_one_encoding_equal_their_own_encoding(tiny, train_dir):
    """The step encodes its prompts once (common.take_prompts cuts the micro-batches): pictures and text prompts."""
    _, processor = tiny
    chats = opcd.student_turns(rows_of(train_dir, 6), text_share=0.5)  # 3 image prompts, then 3 text prompts
    every = common.encode_prompts(processor, chats)
    assert len(every["image_grid_thw"]) == 3
    for ix in ([0, 1, 2, 3, 4, 5], [4, 1], [5, 3], [2], [3, 0, 5], [2, 0]):
        alone = common.encode_prompts(processor, [chats[i] for i in ix])
        taken = common.take_prompts(every, ix)
        assert taken.keys() == alone.keys() and all(torch.equal(taken[k], alone[k]) for k in alone), ix


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_micro_batches_of_similar_length_take_the_same_step(tiny_model, train_dir, monkeypatch, loss):
    """Grouping the rows by length changes the padding, not the step: the same loss, KL and gradients as
    consecutive micro-batches, and the log-probs of the log stay in the responses' order."""
    rows = splits.load_split(train_dir, kinds=["planning"])[::-1][:8]
    args = opcd.parse_args(["--model", tiny_model, "--teacher", tiny_model, "--data", train_dir, "--out", "unused",
                            "--rollout", "hf", "--batch-size", "8", "--micro-batch-size", "2", "--max-new-tokens", "12",
                            "--loss", loss, "--text-share", "0.25", "--no-grad-checkpointing"])
    consecutive = lambda lengths, size: [list(range(i, min(i + size, len(lengths)))) for i in range(0, len(lengths), size)]

    def step(partition):
        model, processor = common.load_model(tiny_model)
        teacher = common.load_teacher(tiny_model, processor, "cpu", torch.float32)
        opt = optim.MasterAdamW(model.train().parameters(), args.lr, tuple(args.betas), args.weight_decay)
        grads, used, take = [], [], opt.step
        monkeypatch.setattr(opt, "step", lambda *a: grads.extend(p.grad.clone() for p in opt.params) or take(*a))
        monkeypatch.setattr(common, "micro_batches", lambda lengths, size: used.append(partition(lengths, size)) or used[-1])
        log = opcd.opcd_step(args, 0, rows, model, teacher, None, processor, opt, 1, torch.device("cpu"))
        return log, grads, used[0]

    log, grads, grouped = step(common.micro_batches)
    plain_log, plain_grads, plain = step(consecutive)
    assert grouped != plain and sorted(sum(grouped, [])) == list(range(8))
    assert log["response_tokens"] == plain_log["response_tokens"] and log["success"] == plain_log["success"]
    for key in ("reverse_kl", "loss", "grad_norm"):
        assert math.isclose(log[key], plain_log[key], rel_tol=1e-5, abs_tol=1e-7), (key, log[key], plain_log[key])
    assert len(grads) == len(plain_grads) > 0
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(grads, plain_grads))


def test_sampled_loss_averaged_over_the_students_distribution_has_the_exact_kl_gradient(tiny, train_dir):
    """In the real model: weighting the REINFORCE loss of every possible first response token by
    its student probability gives ∇KL(p_S ‖ p_T) at that position, the gradient of --loss full.
    Checks the sign and the alignment of response_logprobs against response_hidden."""
    import copy
    from mgsd import common
    import envs

    model, processor = tiny
    student = copy.deepcopy(model).train()
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    row = rows_of(train_dir, 1)[0]
    short = [{"type": "text", "text": "Plan the route."}, {"type": "image", "image": row["image"]}]  # short: 1000 rows
    s_in = common.encode_prompts(processor, [[{"role": "user", "content": short}]])
    t_in = common.encode_prompts(processor, [[{"role": "user", "content": envs.text_state(row["state"])}]])
    one = torch.ones(1, 1)
    with torch.no_grad():
        t_hidden = common.response_hidden(teacher, t_in, torch.zeros(1, 1, dtype=torch.long), one)
    loss, _, _ = opcd.full_reverse_kl(common.response_hidden(student, s_in, torch.zeros(1, 1, dtype=torch.long), one),
                                      student.lm_head, t_hidden, teacher.lm_head, torch.zeros(1, 1, dtype=torch.long),
                                      one, n_tokens=1)
    params = [p for p in student.parameters() if p.requires_grad]
    exact = torch.autograd.grad(loss, params, allow_unused=True)
    vision = set(common.vision_token_ids(processor))  # cannot be fed back (they would be image slots)
    tokens = torch.tensor([t for t in range(student.lm_head.out_features) if t not in vision])
    for chunk in tokens.split(256):  # every other token y as a one-token response
        ids = chunk.unsqueeze(1)
        rep = lambda batch: {k: v.repeat(len(ids), *[1] * (v.dim() - 1)) for k, v in batch.items()}  # noqa: E731
        logprobs = common.response_logprobs(student, rep(s_in), ids, torch.ones_like(ids))
        with torch.no_grad():
            teacher_lp = common.response_logprobs(teacher, rep(t_in), ids, torch.ones_like(ids))
        weight = logprobs.detach().exp()  # E_y~p_S[...] = Σ_y p_S(y) [...]
        opcd.sampled_loss(logprobs, teacher_lp - logprobs.detach(), weight, n_tokens=1).backward()
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    averaged = flat([p.grad for p in params])
    reference = flat([g if g is not None else torch.zeros_like(p) for g, p in zip(exact, params)])
    # the five vision tokens (~0.5 % of a near-uniform student's mass) are missing from the average
    assert F.cosine_similarity(averaged, reference, dim=0) > 0.99
    assert torch.allclose(averaged.norm(), reference.norm(), rtol=0.05)


# ------------------------------------------------------------------------------------------
# End to end: torchrun --nproc_per_node=2 opcd.py on the tiny model, each backend.

CLEAN_ENV = dict(os.environ)  # before any in-process vLLM engine edits the environment


def run_opcd(*args, nproc=2):
    env = dict(CLEAN_ENV, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "opcd.py"), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def master_weights(out):
    return torch.load(Path(out) / "last" / "trainer_state.pt", weights_only=False)["optimizer"]["master"]


@pytest.fixture(scope="module")
def opcd_base(tiny_model, train_dir, make_data):
    return ["--model", tiny_model, "--teacher", tiny_model, "--data", train_dir, "--val-data", make_data("val", 1), "--val-size", 6,
            "--batch-size", 4, "--micro-batch-size", 2, "--max-new-tokens", 12, "--val-every", 2, "--lr", 1e-4,
            "--max-model-len", 2048, "--vllm-kv-cache-mb", 64]


@pytest.fixture(scope="module")
def e2e(opcd_base, tmp_path_factory):
    """torchrun, 2 ranks: hf for 2 steps then --resume to 3; vllm for 3 steps."""
    runs = {}
    out = tmp_path_factory.mktemp("opcd-hf")
    run_opcd(*opcd_base, "--rollout", "hf", "--out", out, "--max-steps", 2)
    runs["hf"] = (out, run_opcd(*opcd_base, "--rollout", "hf", "--out", out, "--max-steps", 3, "--resume"))
    out = tmp_path_factory.mktemp("opcd-vllm")
    runs["vllm"] = (out, run_opcd(*opcd_base, "--rollout", "vllm", "--out", out, "--max-steps", 3))
    return runs


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_torchrun_two_ranks_run_three_steps_with_identical_weights(e2e, backend):
    out, _ = e2e[backend]
    log = read_log(out)
    assert [e["step"] for e in log] == [0, 1, 2, 3]  # step 0: the starting model, validated before training
    per_task = set(log[0]) - {"step", "val_macro_success"}
    assert 0 <= log[0]["val_macro_success"] <= 1 and per_task and all(
        k.removeprefix("val_").removesuffix("_success") in envs.TASKS for k in per_task)
    log = log[1:]
    for e in log:
        assert e["response_tokens"] > 0 and e["grad_norm"] > 0 and e["samples_per_second"] > 0
    saved = [e for e in log if "rank_weight_checksums" in e]
    assert [e["step"] for e in saved] == [2, 3] and all(len(set(e["rank_weight_checksums"])) == 1 for e in saved)
    assert len(saved[0]["rank_weight_checksums"]) == 2
    assert saved[0]["rank_weight_checksums"][0] != saved[1]["rank_weight_checksums"][0]  # the weights moved
    assert 0 <= log[-1]["val_macro_success"] <= 1 and (out / "best" / "model.safetensors").is_file()
    if backend == "vllm":  # rollout log-probs from vLLM = the trainer's recomputation, every step
        assert all(e["vllm_logprob_diff"] < 1e-4 for e in log)


def test_torchrun_resume_continues_where_it_stopped(e2e):
    out, proc = e2e["hf"]
    assert "steps 2->3" in proc.stdout + proc.stderr
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=False)["step"] == 3


def test_resume_is_exact(opcd_base, tmp_path):
    """Single process, in-process: 2 steps + --resume to 3 == 3 steps in one go."""
    args = [str(a) for a in opcd_base] + ["--rollout", "hf"]
    opcd.main(args + ["--out", str(tmp_path / "a"), "--max-steps", "2"])
    assert json.loads((tmp_path / "a" / "done.json").read_text())["steps"] == 2
    opcd.main(args + ["--out", str(tmp_path / "a"), "--max-steps", "3", "--resume"])
    assert json.loads((tmp_path / "a" / "done.json").read_text())["steps"] == 3
    opcd.main(args + ["--out", str(tmp_path / "b"), "--max-steps", "3"])
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [e["step"] for e in a] == [0, 1, 2, 3]
    assert a[3]["reverse_kl"] == pytest.approx(b[3]["reverse_kl"], abs=1e-7)
    for x, y in zip(master_weights(tmp_path / "a"), master_weights(tmp_path / "b")):
        assert torch.equal(x, y)


def test_saved_checkpoint_loads_with_from_pretrained_and_holds_the_trained_weights(e2e, tiny_model):
    from transformers import AutoModelForImageTextToText
    from mgsd import common

    out, _ = e2e["hf"]
    loaded = AutoModelForImageTextToText.from_pretrained(out / "last")
    model, _ = common.load_model(tiny_model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    weights = dict(zip(trainable, master_weights(out)))
    state = loaded.state_dict()
    assert all(torch.equal(state[n], w) for n, w in weights.items())
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters())  # differs from the start


# ------------------------------------------------------------------------------------------
# vLLM: rollouts agree with the trainer; pushed weights are the ones vLLM samples from.


@pytest.fixture(scope="module")
def vllm_engine(e2e):
    """An in-process engine on the checkpoint the torchrun run saved (so: it loads in vLLM)."""
    from mgsd import common

    path = e2e["hf"][0] / "last"
    llm = common.make_llm(path, seed=0, max_model_len=2048, kv_cache_bytes=64 << 20)
    model, processor = common.load_model(path)
    yield llm, model.eval(), processor
    common.close_llm(llm)


def trainer_logprobs(model, processor, msgs, responses):
    from mgsd import common

    ids, mask = common.pad_responses(responses, processor.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        return common.response_logprobs(model, common.encode_prompts(processor, msgs), ids, mask), mask


def test_vllm_rollout_logprobs_match_the_trainers_recomputation(vllm_engine, train_dir):
    from mgsd import common
    import envs

    llm, model, processor = vllm_engine
    msgs = [envs.student_messages(r["state"], r["image"]) for r in rows_of(train_dir, 4)]
    responses = common.sample_responses("vllm", model, llm, processor, msgs, 16, 1.0, 1.0, [11, 12, 13, 14])
    assert all(len(r["token_ids"]) > 0 for r in responses)
    assert not set(common.vision_token_ids(processor)) & {t for r in responses for t in r["token_ids"]}
    again = common.sample_responses("vllm", model, llm, processor, msgs, 16, 1.0, 1.0, [11, 12, 13, 14])
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in responses]  # seeded per request
    recomputed, mask = trainer_logprobs(model, processor, msgs, responses)
    for i, r in enumerate(responses):
        n = len(r["token_ids"])
        assert torch.allclose(torch.tensor(r["logprobs"]), recomputed[i, :n], atol=1e-4)


def test_vllm_seeded_rollout_longer_than_one_scheduler_step(vllm_engine):
    """32 seeded prompts of ~300 tokens: more prompt tokens than vLLM's CPU step budget (4,096). With
    chunked prefill vLLM rewound the CPU generator of a cut prompt and failed (opcd.py --batch-size 32)."""
    llm, model, processor = vllm_engine
    msgs = [[{"role": "user", "content": [{"type": "text", "text": " ".join(str((j * 7 + i) % 10) for j in range(300))}]}]
            for i in range(32)]
    assert sum(len(processor.tokenizer(m[0]["content"][0]["text"])["input_ids"]) for m in msgs) > 4096
    responses = common.sample_responses("vllm", model, llm, processor, msgs, 4, 1.0, 1.0, list(range(32)))
    again = common.sample_responses("vllm", model, llm, processor, msgs, 4, 1.0, 1.0, list(range(32)))
    assert len(responses) == 32 and all(len(r["token_ids"]) > 0 for r in responses)
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in responses]


def vllm_score(llm, processor, messages_list, response_ids_list):
    """vLLM's log-prob of each given response token after its chat prompt: prompt_logprobs of
    [prompt ids | response ids]. The prompt goes in un-expanded (one image placeholder per
    image); vLLM expands it as it does for text prompts. Returns a list of lists of floats."""
    from mgsd import common
    from vllm import SamplingParams

    prompts = []
    for p, response in zip(common.vllm_prompts(processor, messages_list), response_ids_list):
        ids = processor.tokenizer(p.pop("prompt"), add_special_tokens=False)["input_ids"]
        prompts.append(dict(p, prompt_token_ids=ids + list(response)))
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    scores = []
    for out, response in zip(outs, response_ids_list):
        entries = out.prompt_logprobs[len(out.prompt_logprobs) - len(response):]
        scores.append([d[t].logprob for d, t in zip(entries, response)])
    return scores


def test_vllm_follows_pushed_weights_including_merged_lora(vllm_engine, train_dir):
    import copy
    from mgsd import common
    import envs
    from mgsd import lora

    llm, model, processor = vllm_engine
    msgs = [envs.student_messages(r["state"], r["image"]) for r in rows_of(train_dir, 3)]
    responses = [dict(token_ids=list(range(50, 50 + k))) for k in (4, 7, 5)]
    before, mask = trainer_logprobs(model, processor, msgs, responses)
    changed = copy.deepcopy(model)
    lora.add_lora(changed, rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in changed.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))  # moves base weights (vision too) and LoRA B
    after, _ = trainer_logprobs(changed, processor, msgs, responses)
    assert ((after - before).abs() * mask).max() > 0.05
    for weights, expected in ((changed, after), (model, before)):
        common.push_weights(llm, weights)
        scored = vllm_score(llm, processor, msgs, [r["token_ids"] for r in responses])
        for i, s in enumerate(scored):
            assert torch.allclose(torch.tensor(s), expected[i, :len(s)], atol=1e-4)


# ------------------------------------------------------------------------------------------
# It learns: against an opinionated teacher, the student's reverse KL falls.


def test_student_reverse_kl_to_an_opinionated_teacher_falls_by_half(tiny_model, train_dir, tmp_path):
    """The teacher is the tiny model briefly fine-tuned, on teacher prompts, to answer with one
    fixed token repeated. The student (the untouched tiny model) is trained by opcd.main with
    the exact loss at a high lr; the logged reverse-KL estimate mean(ℓS − ℓT) must halve."""
    from mgsd import common
    import envs

    model, processor = common.load_model(tiny_model)
    rows = splits.load_split(train_dir, kinds=["planning"])
    style = [processor.tokenizer("R", add_special_tokens=False)["input_ids"][-1]] * 12  # one token id, repeated
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for it in range(30):
        batch = common.encode_prompts(processor, [envs.teacher_messages(r["state"]) for r in rows[it % 3::3][:8]])
        ids = torch.tensor([style] * batch["input_ids"].shape[0])
        loss = -common.response_logprobs(model, batch, ids, torch.ones_like(ids)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.2  # the teacher now answers "RRR..." with high probability
    common.save_model(model, processor, tmp_path / "teacher")
    opcd.main(["--model", tiny_model, "--teacher", str(tmp_path / "teacher"), "--data", train_dir,
               "--out", str(tmp_path / "run"), "--rollout", "hf", "--loss", "full", "--lr", "3e-3", "--batch-size", "8",
               "--micro-batch-size", "8", "--max-new-tokens", "8", "--max-steps", "30", "--epochs", "100",
               "--val-every", "1000"])
    kl = [e["reverse_kl"] for e in read_log(tmp_path / "run")]
    first, last = sum(kl[:3]) / 3, sum(kl[-3:]) / 3
    assert first > 1.0 and last < 0.5 * first, kl


# ------------------------------------------------------------------------------------------
# The options: each runs a step and does what it says.


def test_options_full_loss_ppo_reward_live_teacher_and_lora(opcd_base, tiny_model, tmp_path):
    from mgsd import common, lora
    from safetensors.torch import load_file

    args = [str(a) for a in opcd_base] + ["--rollout", "hf", "--max-steps", "1", "--val-every", "1000"]
    runs = {"full": ["--loss", "full", "--kl-chunk", "5"], "ppo": ["--updates-per-batch", "2", "--reward-coef", "0.5"],
            "live": ["--teacher", "live", "--no-teacher-plan"], "lora": ["--lora-rank", "4"]}
    logs = {}
    for name, extra in runs.items():
        opcd.main(args + extra + ["--out", str(tmp_path / name)])
        logs[name] = read_log(tmp_path / name)[-1]
        assert logs[name]["grad_norm"] > 0
    assert logs["full"]["loss"] > 0  # the exact reverse KL is positive
    # LoRA: the checkpoint holds W + (alpha/r) B A; only LoRA tensors were trained
    base, _ = common.load_model(tiny_model)
    saved = load_file(str(tmp_path / "lora" / "last" / "model.safetensors"))
    master = master_weights(tmp_path / "lora")
    assert len(master) == 2 * 7 * base.config.text_config.num_hidden_layers
    changed = {k for k, v in base.state_dict().items() if k in saved and not torch.equal(saved[k], v)}
    assert changed and all(".language_model.layers." in k and k.endswith("proj.weight") for k in changed)
    model, _ = common.load_model(tmp_path / "lora" / "last")  # loads as a plain model
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())


@pytest.mark.parametrize("loss", ["sampled", "full"])
def test_gradient_checkpointing_takes_the_same_steps(opcd_base, tmp_path, loss):
    """Non-reentrant checkpointing recomputes the same activations: two steps with and without it end
    at the same fp32 master weights."""
    args = [str(a) for a in opcd_base] + ["--rollout", "hf", "--max-steps", "2", "--val-every", "1000", "--loss", loss,
                                          "--lr", "1e-3"]
    opcd.main(args + ["--out", str(tmp_path / "on")])
    opcd.main(args + ["--no-grad-checkpointing", "--out", str(tmp_path / "off")])
    on, off = read_log(tmp_path / "on"), read_log(tmp_path / "off")
    assert [e["grad_norm"] for e in on[1:]] == pytest.approx([e["grad_norm"] for e in off[1:]], rel=1e-5)  # [0]: step 0
    for a, b in zip(master_weights(tmp_path / "on"), master_weights(tmp_path / "off")):
        assert torch.allclose(a, b, atol=1e-6)
    assert all(e["grad_norm"] > 0 for e in on[1:])


def test_teacher_given_the_image_prompt_only_is_no_teacher(opcd_base, tmp_path):
    """--teacher-context image removes the privileged state: with the live student as teacher the two
    distributions are then identical, so the KL and its gradient vanish; with the state they do not."""
    args = [str(a) for a in opcd_base] + ["--rollout", "hf", "--max-steps", "1", "--val-every", "1000", "--loss", "full",
                                          "--teacher", "live"]
    for context in ("image", "privileged"):
        opcd.main(args + ["--teacher-context", context, "--out", str(tmp_path / context)])
    same, privileged = read_log(tmp_path / "image")[-1], read_log(tmp_path / "privileged")[-1]
    assert abs(same["loss"]) < 1e-6 and same["grad_norm"] < 1e-6  # loss: the exact KL (--loss full)
    assert privileged["loss"] > 1e-3 and privileged["grad_norm"] > 1e-3


def test_text_share_gives_the_last_rows_the_text_prompt(train_dir):
    rows = rows_of(train_dir, 8)
    has_image = lambda chat: any(item["type"] == "image" for m in chat for item in m["content"])  # noqa: E731
    assert all(has_image(c) for c in opcd.student_turns(rows))
    mixed = opcd.student_turns(rows, 0.25)
    assert [has_image(c) for c in mixed] == [True] * 6 + [False] * 2
    assert mixed[6:] == [envs.text_student_messages(r["state"]) for r in rows[6:]]
    assert not any(has_image(c) for c in opcd.student_turns(rows, 1.0))


def test_group_advantage_of_a_hand_made_group():
    """GRPO: each prompt's samples are its own baseline and scale; a group that scored alike teaches nothing."""
    success = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    adv = opcd.group_advantages(success, 4)
    # group 1: mean 1/4, std (n − 1) sqrt((9/16 + 3/16) / 3) = 1/2; group 3: mean 1/2, std sqrt(1/3)
    s3 = math.sqrt(1 / 3) + 1e-4
    expected = [0.75 / 0.5001] + [-0.25 / 0.5001] * 3 + [0.0] * 4 + [-0.5 / s3, 0.5 / s3, -0.5 / s3, 0.5 / s3]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_teacher_none_loads_no_teacher_and_samples_groups(opcd_base, tmp_path, monkeypatch):
    """--teacher none: RL on the success reward. Only the student is loaded, the KL term is zero, every prompt gets
    --samples-per-prompt rollouts, and a group that scored alike gives no gradient."""
    loaded = []
    load = common.load_model
    monkeypatch.setattr(common, "load_model", lambda path, *a, **k: loaded.append(str(path)) or load(path, *a, **k))
    args = [str(a) for a in opcd_base] + ["--rollout", "hf", "--max-steps", "1", "--val-every", "1000",
                                          "--teacher", "none", "--reward-coef", "1", "--samples-per-prompt", "3"]
    opcd.main(args + ["--out", str(tmp_path / "grpo")])
    student = opcd_base[opcd_base.index("--model") + 1]
    assert loaded == [student]
    log = read_log(tmp_path / "grpo")[-1]
    assert log["reverse_kl"] == 0 and log["response_tokens"] > 0
    assert log["success"] == 0 and log["loss"] == 0 and log["grad_norm"] == 0  # a random student fails every prompt
    assert json.loads((tmp_path / "grpo" / "args.json").read_text())["samples_per_prompt"] == 3
    for bad in (["--reward-coef", "0"], ["--loss", "full"], ["--teacher-context", "image"]):
        proc = subprocess.run([sys.executable, str(ROOT / "opcd.py"), *args, *bad, "--out", str(tmp_path / "bad")],
                              capture_output=True, text=True, env=CLEAN_ENV, cwd=ROOT)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and not (tmp_path / "bad").exists(), bad


def test_teacher_must_be_named(tmp_path, tiny_model, train_dir):
    """The reference's teacher is always the base model; no silent default to a copy of the student."""
    proc = subprocess.run([sys.executable, str(ROOT / "opcd.py"), "--model", tiny_model, "--data", train_dir,
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, env=CLEAN_ENV, cwd=ROOT)
    assert proc.returncode == 2 and "--teacher" in proc.stderr and not (tmp_path / "o").exists()


def test_bad_input_fails_with_one_line_and_exit_code_2(tmp_path, tiny_model):
    env = dict(CLEAN_ENV, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "opcd.py"), "--model", tiny_model, "--teacher", tiny_model,
                           "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--rollout", "hf"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 2 and "error:" in proc.stderr and str(tmp_path / "missing") in proc.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------
# --fsdp: the sharded run trains the same weights as the replicated one.


def test_fsdp_run_saves_the_same_weights_as_the_replicated_run_and_resumes(opcd_base, tmp_path):
    """torchrun, 2 ranks, the same seed and global batch: --fsdp (sharded weights, Adam states and
    reduce-scattered gradients) ends at the weights of the replicated run, after 2 steps and after
    --resume to 3; its checkpoint is an ordinary HF folder. The sharded run recomputes activations
    (gradient checkpointing, the default), the replicated one stores them: the same weights either way."""
    from transformers import AutoModelForImageTextToText
    from safetensors.torch import load_file

    args = [*opcd_base, "--rollout", "hf", "--lr", 1e-3]
    saved = lambda run: load_file(str(tmp_path / run / "last" / "model.safetensors"))  # noqa: E731
    start = AutoModelForImageTextToText.from_pretrained(opcd_base[1]).state_dict()
    for steps in (2, 3):
        resume = ["--resume"] if steps == 3 else []
        run_opcd(*args, "--max-steps", steps, "--out", tmp_path / "ddp", "--no-grad-checkpointing", *resume)
        run_opcd(*args, "--max-steps", steps, "--out", tmp_path / "fsdp", "--fsdp", *resume)
        replicated, sharded = saved("ddp"), saved("fsdp")
        assert replicated.keys() == sharded.keys()
        assert all(torch.allclose(replicated[k], sharded[k], atol=1e-5) for k in replicated), steps
        for full, gathered in zip(master_weights(tmp_path / "ddp"), master_weights(tmp_path / "fsdp")):
            assert full.shape == gathered.shape and torch.allclose(full, gathered, atol=1e-5)  # the --resume state
    assert any(not torch.equal(sharded[k], start[k]) for k in sharded)  # the weights moved
    assert [e["step"] for e in read_log(tmp_path / "fsdp")] == [0, 1, 2, 3]
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "fsdp" / "last").state_dict()
    assert all(torch.equal(loaded[k], sharded[k]) for k in sharded)


def test_the_static_kv_cache_decodes_the_greedy_tokens_of_the_dynamic_one(tiny_model, make_data):
    """--hf-cache static (compiled decoding on GPU) changes the speed of an HF rollout, not its tokens; the
    prompts differ in length, so left padding is in play."""
    model, processor = common.load_model(tiny_model)
    rows = splits.load_split(make_data("test", 2, tasks=["frozenlake", "maze"], kinds=("planning",)), kinds=["planning"])
    chats = [envs.student_messages(r["state"], r["image"]) for r in rows[:2] + rows[-2:]]  # both tasks
    assert len({len(processor.apply_chat_template(c, tokenize=False)) for c in chats}) > 1
    dynamic = common.generate_responses(model, processor, chats, 20)
    static = common.generate_responses(model, processor, chats, 20, cache="static")
    assert [o["token_ids"] for o in static] == [o["token_ids"] for o in dynamic] and len(dynamic[0]["token_ids"]) > 5


def test_shared_kv_attention_gives_hf_sdpa_s_losses_gradients_and_tokens(tiny_model, make_data):
    """On CPU load_model runs attention with each key/value head shared by its query heads inside the kernel
    (the tiny model: 4 query heads, 2 key/value heads) instead of HF's copies: the same loss and gradients on
    left-padded picture prompts + right-padded responses, and the same greedy tokens."""
    model, processor = common.load_model(tiny_model)
    assert model.config.get_text_config()._attn_implementation == "sdpa_shared_kv"
    rows = splits.load_split(make_data("test", 2, tasks=["frozenlake", "maze"], kinds=("planning",)), kinds=["planning"])
    chats = [envs.student_messages(r["state"], r["image"]) for r in rows[:2] + rows[-2:]]
    prompts = common.encode_prompts(processor, chats)
    assert (prompts["attention_mask"] == 0).any()  # left padding is in play
    torch.manual_seed(0)
    ids = torch.randint(10, 500, (4, 9))
    mask = torch.tensor([[1.0] * 9, [1.0] * 5 + [0.0] * 4, [1.0] * 7 + [0.0] * 2, [1.0] * 3 + [0.0] * 6])
    results = []
    for attention in ("sdpa_shared_kv", "sdpa"):
        model.set_attn_implementation(attention)
        model.train().zero_grad()
        loss = -common.response_logprobs(model, prompts, ids, mask).sum() / mask.sum()
        loss.backward()
        tokens = [o["token_ids"] for o in common.generate_responses(model, processor, chats, 12)]
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()], tokens))
    (loss, grads, tokens), (hf_loss, hf_grads, hf_tokens) = results
    assert math.isclose(loss, hf_loss, rel_tol=1e-6) and loss > 0
    assert all(torch.allclose(g, h, atol=1e-6) for g, h in zip(grads, hf_grads)) and any(g.abs().sum() > 0 for g in grads)
    assert tokens == hf_tokens and len(tokens[0]) > 5


def test_the_stochastic_step_in_chunks_keeps_the_moments_and_rounds_to_the_same_neighbours():
    """Chunked (64 MB temporaries), the step computes the same fp32 moments and the same fp32 update; each new
    bf16 weight is one of the two neighbours of that update, as without chunks; every gradient is freed."""
    results = []
    for chunk in (1 << 24, 999):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(1000, 37).bfloat16())
        opt = optim.MasterAdamW([w], 1e-3, (0.9, 0.999), 0.01, "stochastic")
        w.grad = torch.randn(w.shape).bfloat16()
        start = w.detach().float().clone()
        opt.stochastic_step(chunk=chunk)
        assert w.grad is None
        results.append((start, w.detach().float(), opt.state[0]["m"].clone(), opt.state[0]["v"].clone()))
    (start, whole, m, v), (_, chunked, m2, v2) = results
    assert torch.equal(m, m2) and torch.equal(v, v2)
    ulp = torch.finfo(torch.bfloat16).eps * start.abs().clamp(min=1e-30) * 2  # at most one bf16 step apart
    assert ((whole - chunked).abs() <= ulp).all() and not torch.equal(whole, start)


def _toy_heads(vocab=11, hidden=6, positions=9):
    g = torch.Generator().manual_seed(3)
    student_head, teacher_head = torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(vocab, hidden, generator=g))
        teacher_head.weight.copy_(torch.randn(vocab, hidden, generator=g))
    hs = torch.randn(1, positions, hidden, generator=g, requires_grad=True)
    ht = torch.randn(1, positions, hidden, generator=g)
    tokens = torch.randint(0, vocab, (1, positions), generator=g)
    mask = torch.ones(1, positions)
    mask[0, -2:] = 0  # padding positions take no part
    return student_head, teacher_head, hs, ht, tokens, mask


def test_topk_kl_with_k_the_whole_vocabulary_is_the_full_kl():
    student_head, teacher_head, hs, ht, tokens, mask = _toy_heads()
    ell_t, top_ids, top_lp, tail = common.teacher_topk(ht, teacher_head, tokens, mask, k=11, chunk=4)
    topk, lp_s = opcd.topk_reverse_kl(hs, student_head, top_ids, top_lp, tail, tokens, mask, n_tokens=7, chunk=4)
    full, lp_s_full, lp_t_full = opcd.full_reverse_kl(hs, student_head, ht, teacher_head, tokens, mask, n_tokens=7, chunk=4)
    torch.testing.assert_close(topk, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(topk, hs)[0], torch.autograd.grad(full, hs)[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp_s, lp_s_full)
    torch.testing.assert_close(ell_t * mask, lp_t_full)


def test_topk_kl_and_its_gradient_match_a_brute_force_sum_over_the_coarsened_vocabulary():
    """K 3 of 11: the loss and its gradient against the definition written out token by token in float64 (to 1e-4
    relative: the tails 1 − Σ_top are fp32 differences, and the toy's smallest teacher tail is 2.4e-4)."""
    student_head, teacher_head, hs, ht, tokens, mask = _toy_heads()
    _, top_ids, top_lp, tail = common.teacher_topk(ht, teacher_head, tokens, mask, k=3, chunk=4)
    loss, _ = opcd.topk_reverse_kl(hs, student_head, top_ids, top_lp, tail, tokens, mask, n_tokens=7, chunk=4)
    got = torch.autograd.grad(loss, hs)[0]
    h = hs.detach().double().requires_grad_()
    p = torch.softmax(h @ student_head.weight.double().T, -1)[0]
    q = torch.softmax(ht.double() @ teacher_head.weight.double().T, -1)[0]
    want = 0
    for t in range(7):  # the unmasked positions
        top = top_ids[0, t].tolist()
        assert sorted(top) == sorted(q[t].argsort(descending=True)[:3].tolist())  # the teacher's own top 3
        for v in top:
            want = want + p[t, v] * (p[t, v].log() - q[t, v].log())
        tail_p, tail_q = 1 - sum(p[t, v] for v in top), 1 - sum(q[t, v] for v in top)
        want = want + tail_p * (tail_p.log() - tail_q.log())
    want = want / 7
    torch.testing.assert_close(loss.double(), want, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got.double(), torch.autograd.grad(want, h)[0], atol=1e-5, rtol=1e-4)
    assert 0 < loss < opcd.full_reverse_kl(hs, student_head, ht, teacher_head, tokens, mask, n_tokens=7)[0]  # a bound


def _confident_teacher(teacher_tail, vocab=64, k=5, positions=6):
    """Teacher logits [1, P, V] (fp32) whose mass outside its top k is `teacher_tail` at every position, as a
    teacher shown the reference plan gives on most plan tokens; an identity head reads them as hidden states."""
    g = torch.Generator().manual_seed(7)
    top = torch.tensor([0.0, -1.0, -2.0, -3.0, -4.0]).double()
    rest = torch.randn(positions, vocab - k, generator=g).double()
    # shift the rest so that Σ_rest e^x / (Σ_top e^x + Σ_rest e^x) = teacher_tail
    shift = math.log(teacher_tail / (1 - teacher_tail)) + top.logsumexp(0) - rest.logsumexp(-1, keepdim=True)
    logits = torch.cat([top.expand(positions, k), rest + shift], -1)
    logits = logits[:, torch.randperm(vocab, generator=g)]  # the top ids anywhere in the vocabulary
    head = torch.nn.Linear(vocab, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab))
    return logits.float().unsqueeze(0), head


@pytest.mark.parametrize("teacher_tail", [1e-3, 1e-6, 1e-9, 1e-12])
def test_topk_kl_of_a_confident_teacher_matches_float64_and_never_exceeds_the_full_kl(teacher_tail):
    """The case 1 − Σ_top in fp32 got wrong (at a teacher tail of 1.4e-9 the loss was 5.07 against 1.35): the loss
    and its gradient against the coarsened KL written out in float64 from the same fp32 logits, to 1e-4."""
    vocab, k, positions = 64, 5, 6
    ht, teacher_head = _confident_teacher(teacher_tail, vocab, k, positions)
    g = torch.Generator().manual_seed(8)
    student_head = torch.nn.Linear(16, vocab, bias=False)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(vocab, 16, generator=g) * 0.5)
    hs = torch.randn(1, positions, 16, generator=g, requires_grad=True)
    tokens, mask = torch.randint(0, vocab, (1, positions), generator=g), torch.ones(1, positions)
    _, top_ids, top_lp, tail = common.teacher_topk(ht, teacher_head, tokens, mask, k=k, chunk=4)
    loss, _ = opcd.topk_reverse_kl(hs, student_head, top_ids, top_lp, tail, tokens, mask, n_tokens=positions, chunk=4)
    got = torch.autograd.grad(loss, hs)[0]
    h = hs.detach().double().requires_grad_()
    log_p = torch.log_softmax(h @ student_head.weight.double().T, -1)[0]
    log_q = torch.log_softmax(ht.double(), -1)[0]
    want = 0
    for t in range(positions):
        top = top_ids[0, t].tolist()
        rest = [v for v in range(vocab) if v not in top]
        assert math.isclose(log_q[t, rest].logsumexp(0).exp().item(), teacher_tail, rel_tol=1e-3)
        for v in top:
            want = want + log_p[t, v].exp() * (log_p[t, v] - log_q[t, v])
        tail_p, tail_q = log_p[t, rest].logsumexp(0), log_q[t, rest].logsumexp(0)
        want = want + tail_p.exp() * (tail_p - tail_q)
    want = want / positions
    torch.testing.assert_close(loss.double(), want, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got.double(), torch.autograd.grad(want, h)[0], atol=1e-6, rtol=1e-4)
    full = opcd.full_reverse_kl(hs, student_head, ht, teacher_head, tokens, mask, n_tokens=positions)[0]
    assert loss <= full * (1 + 1e-6)  # coarsening never adds divergence


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 3, 10])
def test_topk_kl_is_never_above_the_full_kl(seed, k):
    g = torch.Generator().manual_seed(seed)
    student_head, teacher_head = torch.nn.Linear(8, 40, bias=False), torch.nn.Linear(8, 40, bias=False)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(40, 8, generator=g) * (1 + seed))
        teacher_head.weight.copy_(torch.randn(40, 8, generator=g) * (1 + 2 * seed))  # up to a very confident teacher
    hs, ht = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    tokens, mask = torch.randint(0, 40, (2, 5), generator=g), torch.ones(2, 5)
    _, top_ids, top_lp, tail = common.teacher_topk(ht, teacher_head, tokens, mask, k=k)
    topk = opcd.topk_reverse_kl(hs, student_head, top_ids, top_lp, tail, tokens, mask, n_tokens=10)[0]
    full = opcd.full_reverse_kl(hs, student_head, ht, teacher_head, tokens, mask, n_tokens=10)[0]
    assert 0 <= topk <= full * (1 + 1e-6) + 1e-7


@pytest.mark.parametrize("teacher_tail", [1e-2, 1e-4, 1e-6, 1e-9, 1e-12])
def test_a_served_teachers_tail_is_never_more_than_1e5_below_the_true_one(teacher_tail):
    """From top-k log-probs as a server returns them (fp32 log-softmax, rounded): 1 − Σ exp(top) in float64,
    floored at 1e-5 where the fp32 values cannot resolve the tail."""
    logits, _ = _confident_teacher(teacher_tail)
    top_lp = torch.log_softmax(logits, -1).topk(5, -1).values  # fp32, what the server computes
    tail = common.served_tail(top_lp).double().exp()
    assert (tail >= teacher_tail - 1e-5).all() and (tail >= common.SERVED_TAIL_FLOOR * (1 - 1e-6)).all()
    if teacher_tail >= 1e-4:  # resolved: within the fp32 values' error
        assert (tail - teacher_tail).abs().max() <= 1e-5


def test_a_wider_teacher_with_the_students_tokenizer_teaches_with_every_loss(tiny_model, make_data, tmp_path):
    """A teacher of another size (hidden 192, 4 layers; the student: 128, 2) needs only the same tokenizer: its
    own output head scores the student's tokens."""
    from mgsd import tiny

    bigger = tiny.build_model(tmp_path / "bigger", size="small", seed=1, tokenizer=tiny_model)
    data = make_data("train", 2, tasks=["frozenlake", "maze"], kinds=("planning",))
    for loss in ("sampled", "full", "topk"):
        out = tmp_path / loss
        opcd.main([str(a) for a in ["--model", tiny_model, "--teacher", bigger, "--data", data, "--out", out, "--rollout", "hf",
                                    "--loss", loss, "--batch-size", 2, "--max-new-tokens", 8, "--max-steps", 1]])
        entry = read_log(out)[0]
        assert math.isfinite(entry["reverse_kl"]) and entry["grad_norm"] > 0 and entry["response_tokens"] > 0, loss
        if loss != "sampled":  # an exact divergence between two different models: positive
            assert entry["loss"] > 0
