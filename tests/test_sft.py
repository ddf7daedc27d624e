"""sft.py: labels, gradients, DDP equivalence, resume, bad input, and that it learns."""
import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sft
from mgsd import common, lora, splits

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(*args, torchrun=False):
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun else [PY]
    return subprocess.run(cmd + [str(ROOT / "sft.py"), *map(str, args)], capture_output=True, text=True, env=_env(),
                          timeout=600)


def _weights(out):
    return load_file(str(Path(out) / "checkpoint" / "trainable.safetensors"))


@pytest.fixture(scope="module")
def train_dir(make_data):
    return make_data("train", 4, tasks=["frozenlake", "maze"], levels=None, kinds=("perception", "planning"))


@pytest.fixture(scope="module")
def processor(tiny_model):
    return common.load_model(tiny_model)[1]


def test_labels_are_minus_100_except_assistant_tokens(processor, train_dir):
    row = splits.load_split(train_dir, kinds=["perception"])[0]
    enc = sft.encode_chat(processor, row["messages"])
    ids, labels = enc["input_ids"].tolist(), enc["labels"].tolist()
    tok = processor.tokenizer
    # The whole sequence is the rendered chat, with the image placeholder expanded to 16 tokens.
    rendered = processor.apply_chat_template(row["messages"], tokenize=False)
    assert tok.decode(ids) == rendered.replace("<|image_pad|>", "<|image_pad|>" * 16)
    # Token by token: labelled exactly from the first answer token through <|im_end|>.
    prompt = processor.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt.replace("<|image_pad|>", "<|image_pad|>" * 16), add_special_tokens=False)["input_ids"])
    answer_ids = tok(row["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    for i, (t, lab) in enumerate(zip(ids, labels)):
        inside = n_prompt <= i < n_prompt + len(answer_ids)
        assert lab == (t if inside else -100), f"token {i} {tok.decode([t])!r}"
    assert ids[n_prompt:n_prompt + len(answer_ids)] == answer_ids
    assert tok.decode([ids[-1]]) == "\n" and labels[-1] == -100  # the newline after <|im_end|> is not trained
    assert int(enc["mm_token_type_ids"].sum()) == 16 and enc["image_grid_thw"].tolist() == [[1, 8, 8]]
    # The trained prefix is exactly the prompt the model sees at generation time.
    assert ids[:n_prompt] == common.encode_prompts(processor, [row["messages"][:-1]])["input_ids"][0].tolist()


def test_every_assistant_turn_is_labelled_in_a_multi_turn_chat(processor):
    chat = [{"role": "user", "content": [{"type": "text", "text": "Map size?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "3x3"}]},
            {"role": "user", "content": [{"type": "text", "text": "Player?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "(0, 1)"}]}]
    enc = sft.encode_chat(processor, chat)
    tok = processor.tokenizer
    trained = [t for t, lab in zip(enc["input_ids"].tolist(), enc["labels"].tolist()) if lab != -100]
    assert tok.decode(trained) == "3x3<|im_end|>(0, 1)<|im_end|>"
    assert tok.decode(enc["input_ids"]) == processor.apply_chat_template(chat, tokenize=False)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    lrs = [sft.lr_at(s, 100, 1e-3, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # 10 warm-up steps, linear
    assert lrs[50] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 40 / 90)))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-6


def _grads(model, batch):
    model.zero_grad()
    sft.sft_loss(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_grad_checkpointing_gives_same_gradients(tiny_model, train_dir, processor):
    rows = splits.load_split(train_dir)[:3]
    batch = sft.collate([sft.encode_chat(processor, r["messages"]) for r in rows], processor.tokenizer.pad_token_id)
    assert "pixel_values" in batch
    model, _ = common.load_model(tiny_model)
    lora.add_lora(model)
    for m in model.modules():  # a non-zero B so that every LoRA weight gets a gradient
        if isinstance(m, lora.LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    model.train()
    plain = _grads(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = _grads(model, batch)
    assert plain and set(plain) == set(checkpointed)
    assert all(g.abs().sum() > 0 for g in plain.values())
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], atol=1e-6, rtol=1e-5)


def test_micro_batches_of_similar_length_pad_less_and_keep_the_summed_gradient(tiny_model, train_dir, processor):
    rows = splits.load_split(train_dir)[:8]
    examples = [sft.encode_chat(processor, r["messages"]) for r in rows]
    pad = processor.tokenizer.pad_token_id
    grouped = sft.micro_batches(examples, 2, pad)
    consecutive = [sft.collate(examples[i:i + 2], pad) for i in range(0, 8, 2)]
    padding = [sum(b["attention_mask"].numel() - b["attention_mask"].sum().item() for b in m) for m in (grouped, consecutive)]
    assert padding[0] < padding[1] and sum(b["input_ids"].shape[0] for b in grouped) == 8
    model, _ = _lora_model_and_batch(tiny_model, train_dir, processor)
    n_target = sum(len(b["target_positions"]) for b in grouped)  # the step's token mean, as sft.py takes it
    grads = []
    for micro in (grouped, consecutive):
        model.zero_grad(set_to_none=True)
        for b in micro:
            (sft.sft_loss(model, b) / n_target).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[1]:  # float32 sums in another order: relative 1e-4
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-7, rtol=1e-4)


def _lora_model_and_batch(tiny_model, train_dir, processor):
    rows = splits.load_split(train_dir)[:3]
    batch = sft.collate([sft.encode_chat(processor, r["messages"]) for r in rows], processor.tokenizer.pad_token_id)
    model, _ = common.load_model(tiny_model)
    lora.add_lora(model)
    for m in model.modules():  # a non-zero B so that every LoRA weight gets a gradient
        if isinstance(m, lora.LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.02)
    return model.train(), batch


@pytest.mark.parametrize("share, n, chosen", [(1.0, 8, range(8)), (0.75, 8, [1, 2, 3, 5, 6, 7]), (0.5, 8, [1, 3, 5, 7]),
                                               (0.25, 36, [3, 7, 11, 15, 19, 23, 27, 31, 35]), (0.0, 8, [])])
def test_a_share_of_the_layers_checkpointed_is_that_many_spread_evenly(share, n, chosen):
    model = types.SimpleNamespace(gradient_checkpointing_enable=lambda **kw: None, model=types.SimpleNamespace(
        language_model=types.SimpleNamespace(layers=[types.SimpleNamespace() for _ in range(n)])))
    common.enable_checkpointing(model, share)
    assert [i for i, layer in enumerate(model.model.language_model.layers) if layer.gradient_checkpointing] == list(chosen)


def test_checkpointing_half_the_layers_recomputes_those_only_and_keeps_the_gradients(tiny_model, train_dir, processor):
    model, batch = _lora_model_and_batch(tiny_model, train_dir, processor)
    plain = _grads(model, batch)
    common.enable_checkpointing(model, share=0.5)
    assert [layer.gradient_checkpointing for layer in model.model.language_model.layers] == [False, True]
    selective = _grads(model, batch)
    for n in plain:
        torch.testing.assert_close(selective[n], plain[n], atol=1e-6, rtol=1e-5)


def test_the_chunked_loss_equals_the_whole_vocabulary_cross_entropy_with_its_gradients(tiny_model, train_dir, processor):
    """sft_loss never holds [tokens, vocab] logits; the value and every gradient are those of one cross-entropy
    over all labelled positions at once (fp32: the value to 1e-6 relative; each gradient to 1e-5 of its largest
    element, the rounding of summing the positions in another order)."""
    model, batch = _lora_model_and_batch(tiny_model, train_dir, processor)
    model.zero_grad()
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         mm_token_type_ids=batch["mm_token_type_ids"], pixel_values=batch["pixel_values"],
                         image_grid_thw=batch["image_grid_thw"], use_cache=False)[0]
    keep = batch["labels"][:, 1:] != -100
    whole = torch.nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][keep]), batch["labels"][:, 1:][keep],
                                              reduction="sum")
    whole.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    chunked = sft.sft_loss(model, batch, chunk=7)  # 7 positions a chunk: several chunks and a ragged last one
    chunked.backward()
    assert keep.sum() > 3 * 7
    torch.testing.assert_close(chunked, whole, atol=0, rtol=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert (p.grad - reference[n]).abs().max() <= 1e-5 * reference[n].abs().max(), n


def test_fused_lora_forward_and_gradients_equal_the_two_products():
    torch.manual_seed(0)
    layer = lora.LoRALinear(torch.nn.Linear(24, 40), rank=4, alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 24, requires_grad=True)
    A, B, W, b = layer.lora_A.weight, layer.lora_B.weight, layer.base_layer.weight, layer.base_layer.bias
    reference = x @ W.T + b + 2.0 * (x @ A.T) @ B.T  # W x + (alpha / r) B A x
    grads = torch.autograd.grad(reference.square().sum(), [x, A, B, W])
    out = layer(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-6)
    for got, want in zip(torch.autograd.grad(out.square().sum(), [x, A, B, W]), grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_bf16_frozen_weights_keep_the_first_loss_and_gradient_norm_within_bf16_precision(tiny_model, train_dir, tmp_path):
    """--dtype bfloat16 (the GPU default): frozen weights bf16, LoRA adapters fp32. One step from the same start:
    the loss within 1 % and the gradient norm within 3 % of the fp32 run (bf16 keeps 8 significant bits)."""
    first = {}
    for dtype in ("float32", "bfloat16"):
        sft.main(["--model", tiny_model, "--data", train_dir, "--out", tmp_path / dtype, "--batch-size", 4,
                  "--micro-batch-size", 2, "--max-steps", 1, "--dtype", dtype])
        first[dtype] = json.loads((tmp_path / dtype / "log.jsonl").read_text().splitlines()[0])
    assert first["bfloat16"]["loss"] == pytest.approx(first["float32"]["loss"], rel=1e-2)
    assert first["bfloat16"]["grad_norm"] == pytest.approx(first["float32"]["grad_norm"], rel=3e-2)
    assert first["bfloat16"]["loss"] != first["float32"]["loss"]  # the flag did change the arithmetic
    trained = _weights(tmp_path / "bfloat16")
    assert trained and all(w.dtype == torch.float32 for w in trained.values())  # the adapters stay fp32


def test_text_only_batch_skips_the_vision_tower(tiny_model, processor, make_data):
    rows = splits.load_split(make_data("train", 2, tasks=["maze"], levels=[3], kinds=("text-planning",)))
    batch = sft.collate([sft.encode_chat(processor, r["messages"]) for r in rows[:2]], processor.tokenizer.pad_token_id)
    model, _ = common.load_model(tiny_model)
    calls = []
    model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    loss = sft.sft_loss(model, batch)
    assert torch.isfinite(loss) and loss > 0 and calls == []


def test_lora_sft_trains_only_lora_and_writes_a_peft_adapter(tiny_model, train_dir, tmp_path):
    out = tmp_path / "run"
    sft.main(["--model", tiny_model, "--data", train_dir, "--out", out, "--batch-size", 4, "--micro-batch-size", 2,
              "--max-steps", 2, "--lr", 1e-2])
    weights = _weights(out)
    assert weights and all(".lora_A." in n or ".lora_B." in n for n in weights)
    assert any(".lora_B." in n and w.abs().max() > 0 for n, w in weights.items())  # B moved off zero
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and all(x["loss"] > 0 for x in lines)


def test_stage_one_trains_on_perception_rows_only_by_default(tiny_model, train_dir, tmp_path, capsys):
    """The reference's stage 1 never sees a plan: without --kinds, planning rows are left out."""
    rows = splits.load_split(train_dir)
    perception = sum(r["kind"] == "perception" for r in rows)
    assert 0 < perception < len(rows)
    sft.main(["--model", tiny_model, "--data", train_dir, "--out", tmp_path / "run", "--batch-size", 4,
              "--micro-batch-size", 4, "--max-steps", 1])
    assert f"sft: {perception} rows," in capsys.readouterr().out


def test_full_sft_leaves_the_vision_tower_frozen(tiny_model, train_dir, tmp_path):
    out = tmp_path / "full"
    sft.main(["--model", tiny_model, "--data", train_dir, "--out", out, "--full", "--batch-size", 4,
              "--micro-batch-size", 4, "--max-steps", 1, "--lr", 1e-2])
    trained, _ = common.load_model(out / "model")
    base, _ = common.load_model(tiny_model)
    base_sd = base.state_dict()
    changed = {n for n, t in trained.state_dict().items() if not torch.equal(t, base_sd[n])}
    assert changed and not any(n.startswith("model.visual.") for n in changed)
    assert any("language_model.layers.0.self_attn.q_proj" in n for n in changed)


def test_train_vision_trains_the_tower_and_needs_full(tiny_model, train_dir, tmp_path):
    out = tmp_path / "vision"
    sft.main(["--model", tiny_model, "--data", train_dir, "--out", out, "--full", "--train-vision", "--batch-size", 4,
              "--micro-batch-size", 4, "--max-steps", 1, "--lr", 1e-2])
    trained, _ = common.load_model(out / "model")
    base_sd = common.load_model(tiny_model)[0].state_dict()
    changed = {n for n, t in trained.state_dict().items() if not torch.equal(t, base_sd[n])}
    assert any(n.startswith("model.visual.blocks.0.") for n in changed)
    assert any(n.startswith("model.visual.merger.") for n in changed)
    assert any("language_model.layers.0.self_attn.q_proj" in n for n in changed)
    lora = _run("--model", tiny_model, "--data", train_dir, "--out", tmp_path / "lora", "--train-vision",
                "--batch-size", 4, "--max-steps", 1)
    assert lora.returncode == 2 and "--train-vision needs --full" in lora.stderr
    assert not (tmp_path / "lora").exists()


def test_resume_after_interrupt_equals_uninterrupted_run(tiny_model, train_dir, tmp_path):
    common_args = ["--model", tiny_model, "--data", train_dir, "--batch-size", 4, "--micro-batch-size", 2,
                   "--epochs", 1, "--lr", 1e-2]
    sft.main(common_args + ["--out", tmp_path / "straight", "--max-steps", 4])
    sft.main(common_args + ["--out", tmp_path / "split", "--max-steps", 2])
    sft.main(common_args + ["--out", tmp_path / "split", "--max-steps", 4, "--resume"])
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert set(a) == set(b)
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=0, rtol=0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_torchrun_two_ranks_match_each_other_and_a_single_process(tiny_model, make_data, tmp_path):
    # Image rows and text-only rows mixed: some micro-batches skip the vision tower, on one rank only.
    data = make_data("train", 4, tasks=["frozenlake", "maze"], kinds=("perception", "text-planning"))
    args = ["--model", tiny_model, "--data", data, "--kinds", "perception,text-planning", "--batch-size", 8,
            "--max-steps", 2, "--lr", 1e-2]
    ddp = _run(*args, "--out", tmp_path / "ddp", "--micro-batch-size", 1, torchrun=True)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single = _run(*args, "--out", tmp_path / "single", "--micro-batch-size", 8)
    assert single.returncode == 0, single.stderr[-2000:]
    metrics = [json.loads(x) for x in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert [m["ddp/replica_max_abs_diff"] for m in metrics if "ddp/replica_max_abs_diff" in m] == [0.0]
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    assert any(w.abs().max() > 0 for n, w in a.items() if ".lora_B." in n)
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-4, rtol=1e-3)  # lr 1e-2: 1% of one Adam step


@pytest.mark.parametrize("case", ["missing data dir", "missing image", "model without processor"])
def test_bad_input_gives_one_clear_error_and_no_checkpoint(case, tiny_model, train_dir, tmp_path):
    data, model = Path(train_dir), Path(tiny_model)
    if case == "missing data dir":
        data = tmp_path / "nowhere"
    elif case == "missing image":
        data = tmp_path / "data"
        shutil.copytree(train_dir, data)
        row = json.loads((data / "data.jsonl").read_text().splitlines()[0])
        (data / row["image"]).unlink()
    else:
        model = tmp_path / "bare"
        common.load_model(tiny_model)[0].save_pretrained(model)
    result = _run("--model", model, "--data", data, "--out", tmp_path / "out", "--batch-size", 4, "--max-steps", 1)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_perception_sft_learns_player_position(tiny_model, make_data, tmp_path):
    """The tiny model, FrozenLake 3x3 images (128 px): held-out player-position accuracy rises
    from chance (1/9) to at least 3x chance in about a CPU minute of full SFT (~370 steps)."""
    train = make_data("train", 300, tasks=["frozenlake"], levels=[3], kinds=("perception",))
    val = make_data("val", 40, tasks=["frozenlake"], levels=[3], kinds=("perception",))
    out = tmp_path / "learn"
    result = _run("--model", tiny_model, "--data", train, "--val-data", val, "--out", out, "--full", "--lr", 2e-3,
                  "--batch-size", 8, "--micro-batch-size", 8, "--epochs", 10, "--val-size", 40,
                  "--max-new-tokens", 40, "--no-grad-checkpointing")
    assert result.returncode == 0, result.stderr[-2000:]
    # Before training: the same validation on the untouched model.
    base, processor = common.load_model(tiny_model)
    args = sft.parse_args(["--model", tiny_model, "--data", train, "--out", str(tmp_path / "x"),
                           "--max-new-tokens", "40", "--micro-batch-size", "8"])
    before = sft.validate(base, processor, splits.load_split(val), args, 0, 1, torch.device("cpu"),
                          torch.autocast("cpu", enabled=False))
    after = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if "val/loss" in x][-1]
    chance = 1 / 9
    assert before["val/perception/player"] <= 2 * chance
    assert after["val/perception/player"] >= 3 * chance, after
    assert after["val/loss"] < before["val/loss"] / 4


def test_rows_encoded_by_loader_workers_train_the_same_weights(tiny_model, train_dir, tmp_path):
    """--loader-workers 2 (the next steps' rows encoded in other processes) changes where the work is done, not
    the step: the same weights, bit for bit."""
    for workers in (0, 2):  # a process of its own: forked workers of a test process that ran vLLM engines can hang
        run = _run("--model", tiny_model, "--data", train_dir, "--out", tmp_path / f"w{workers}", "--batch-size", 4,
                   "--micro-batch-size", 2, "--max-steps", 2, "--lr", 1e-2, "--loader-workers", workers)
        assert run.returncode == 0, run.stderr[-2000:]
    a, b = _weights(tmp_path / "w0"), _weights(tmp_path / "w2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if ".lora_B." in k)
