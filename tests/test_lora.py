"""The shared model layer (mgsd/common.py): tiny models, loading, log-prob gather, hand-rolled LoRA."""
import json

import pytest
import torch
from PIL import Image

import envs
from mgsd import cli, common, lora, tiny


def _batch(processor):
    img = Image.new("RGB", (128, 128), (40, 90, 200))
    img.paste((250, 250, 250), (32, 64, 64, 96))
    chats = [[{"role": "user", "content": [{"type": "text", "text": "Where is the player?"}, {"type": "image", "image": img}]}],
             [{"role": "user", "content": [{"type": "text", "text": "Task: FrozenLake\nMap size: 3x3"}]}]]
    return common.encode_prompts(processor, chats)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return common.load_model(tiny_model)


def test_tiny_model_has_qwen_special_tokens_and_16_image_tokens(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(tiny.SPECIAL_TOKENS)
    assert ids == sorted(ids) and ids[1:] == [ids[0] + i for i in range(1, len(ids))]  # Qwen's order, contiguous
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    text = model.config.text_config
    assert text.head_dim >= 32 and sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    batch = _batch(processor)
    assert (batch["input_ids"][0] == model.config.image_token_id).sum() == 16
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8]]  # 128 px / 16 px patches, not resized


def test_tokenizer_training_is_deterministic():
    corpus = tiny.tokenizer_corpus()
    a, b = tiny.train_tokenizer(corpus), tiny.train_tokenizer(corpus)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) > 300


def test_tokenizer_round_trips_every_prompt_and_keeps_digits_and_plan_letters_apart(loaded):
    tok = loaded[1].tokenizer
    texts = []
    for task, level in (("frozenlake", 4), ("maze", 3), ("minibehaviour", 5)):
        state = next(s for s in (envs.generate(task, level, seed) for seed in range(50)) if s is not None)
        texts += [envs.reference_response(state), envs.text_state(state), envs.perception_answer(state),
                  envs.teacher_messages(state)[-1]["content"]]
    for text in texts:
        text = text if isinstance(text, str) else text[0]["text"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        pieces = [tok.decode([i]) for i in ids]
        assert all(not any(ch.isdigit() for ch in p) or len(p) == 1 for p in pieces), pieces
    answer = tok("<answer>RRDU</answer>", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in answer][1:5] == ["R", "R", "D", "U"]
    # the fixed instructions merge across words (a word-level split gives at least one token per word)
    prompt = envs.student_messages(state, "x.png")[0]["content"][0]["text"]
    assert len(tok(prompt, add_special_tokens=False)["input_ids"]) < 0.75 * len(prompt.split())


def test_chat_template_renders_image_as_vision_block(loaded):
    _, processor = loaded
    chat = [{"role": "user", "content": [{"type": "text", "text": "Q"}, {"type": "image", "image": "x.png"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A"}]}]
    text = processor.apply_chat_template(chat, tokenize=False)
    assert text == "<|im_start|>user\nQ<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"


def test_encode_prompts_pads_on_the_left(loaded):
    _, processor = loaded
    batch = _batch(processor)
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and not mask[1, 0]
    assert (batch["input_ids"][1][mask[1] == 0] == processor.tokenizer.pad_token_id).all()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_response_logprobs_match_unpadded_full_forward(loaded, temperature):
    """... of logits / temperature: the rollout's sampling distribution, as the reference computes it."""
    model, processor = loaded
    batch = _batch(processor)
    response = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    response_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        got = common.response_logprobs(model, batch, response, response_mask, temperature)
    assert got.shape == (2, 4)
    for i in range(2):  # each row alone, no padding at all, full log_softmax
        n = int(response_mask[i].sum())
        keep = batch["attention_mask"][i] == 1
        ids = torch.cat([batch["input_ids"][i][keep], response[i, :n]])[None]
        mm = torch.cat([batch["mm_token_type_ids"][i][keep], torch.zeros(n, dtype=torch.long)])[None]
        extra = {k: batch[k] for k in ("pixel_values", "image_grid_thw")} if i == 0 else {}
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm, **extra).logits[0]
        P = int(keep.sum())
        ref = torch.log_softmax(logits[P - 1:P + n - 1] / temperature, -1).gather(-1, response[i, :n, None]).squeeze(-1)
        torch.testing.assert_close(got[i, :n], ref, atol=1e-5, rtol=1e-5)


def test_load_model_rejects_folder_without_processor(loaded, tmp_path):
    model, _ = loaded
    model.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="processor"):
        common.load_model(tmp_path / "bare")
    with pytest.raises(FileNotFoundError):
        common.load_model(tmp_path / "missing")


def test_fresh_lora_leaves_outputs_unchanged(tiny_model):
    model, processor = common.load_model(tiny_model)
    batch = _batch(processor)
    before = _logits(model, batch)
    names = lora.add_lora(model, rank=4, alpha=8)
    assert len(names) == 7 * model.config.text_config.num_hidden_layers
    assert all("language_model" in n for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    torch.testing.assert_close(_logits(model, batch), before, atol=0, rtol=0)


def _trained_lora(tiny_model, seed=1):
    model, processor = common.load_model(tiny_model)
    lora.add_lora(model, rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, lora.LoRALinear):  # stand-in for training: non-zero B
            m.lora_B.weight.data = torch.randn(m.lora_B.weight.shape, generator=g) * 0.05
    return model, processor


def test_merged_lora_equals_unmerged(tiny_model):
    model, processor = _trained_lora(tiny_model)
    batch = _batch(processor)
    unmerged = _logits(model, batch)
    base, _ = common.load_model(tiny_model)
    assert (unmerged - _logits(base, batch)).abs().max() > 1e-3  # the adapter does something
    lora.merge_lora(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, batch), unmerged, atol=1e-5, rtol=1e-5)


def test_saved_adapter_roundtrips_and_peft_reproduces_our_logits(tiny_model, tmp_path):
    peft = pytest.importorskip("peft")
    model, processor = _trained_lora(tiny_model)
    batch = _batch(processor)
    ours = _logits(model, batch)
    lora.save_adapter(model, tmp_path / "adapter", tiny_model)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8

    reloaded, _ = common.load_model(tiny_model)
    lora.load_adapter(reloaded, tmp_path / "adapter")
    torch.testing.assert_close(_logits(reloaded, batch), ours, atol=0, rtol=0)

    base, _ = common.load_model(tiny_model)
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    n_lora = sum(1 for n, _ in peft_model.named_modules() if n.endswith("lora_A.default"))
    assert n_lora == 7 * base.config.text_config.num_hidden_layers
    torch.testing.assert_close(_logits(peft_model, batch), ours, atol=1e-5, rtol=1e-5)


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with cli.atomic_dir(tmp_path / "ckpt") as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with cli.atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "done.txt").write_text("ok")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"] and (tmp_path / "ckpt" / "done.txt").read_text() == "ok"


def test_unsampled_ids_are_the_vision_tokens_and_the_vocabulary_padding(loaded):
    model, processor = loaded
    vocab_size = model.config.get_text_config().vocab_size
    banned = common.unsampled_token_ids(processor, vocab_size)
    padding = set(range(len(processor.tokenizer), vocab_size))
    assert padding, "the tiny model's vocabulary is padded past the tokenizer"
    assert set(banned) == padding | set(common.vision_token_ids(processor))
    # Greedy decoding of the random model never produces a banned id.
    batch = common.encode_prompts(processor, [[{"role": "user", "content": [{"type": "text", "text": "Map 3x3."}]}]])
    out = model.generate(**batch, do_sample=False, max_new_tokens=40, suppress_tokens=banned,
                         pad_token_id=processor.tokenizer.pad_token_id)
    assert not set(out[0, batch["input_ids"].shape[1]:].tolist()) & set(banned)
