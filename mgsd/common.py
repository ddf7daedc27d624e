"""The shared model layer: what more than one stage needs. torchrun set-up (gloo on CPU, NCCL on GPU);
one `load_model` for a local folder or hub id (the real Qwen3-VL and our tiny models alike); atomic model
writes; prompt encoding (left padding); HF and vLLM decoding that ban the same tokens; per-token log-probs
on the layout [left-padded prompt P | right-padded response R]; the run log; the in-process vLLM engine."""
import importlib.util
import math
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

import envs
from mgsd import chat_api, cli, optim
from mgsd.lora import LoRALinear

# ------------------------------------------------------------------------------------------
# Distributed set-up and logging


def compute_init(seed=0):
    """torchrun-aware set-up. Returns (ddp, rank, local_rank, world_size, device)."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, local_rank, world_size = [int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")] if ddp else [0, 0, 1]
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# ------------------------------------------------------------------------------------------
# Saving


def save_model(model, processor, out_dir, trainer_state=None, rank=0):
    """A from_pretrained-loadable folder (LoRA layers merged), plus trainer_state.pt for --resume; atomic.
    Every rank calls it (under --fsdp the weights are gathered); rank 0 writes."""
    weights = hf_state_dict(model)
    cli.require_finite(weights, f"refusing to write {out_dir}")
    if rank == 0:
        with cli.atomic_dir(out_dir) as tmp, cli.write_failure(out_dir):
            write_model_files(model, processor, tmp, weights)
            if trainer_state is not None:
                torch.save(trainer_state, tmp / "trainer_state.pt")
    return Path(out_dir)


def enable_checkpointing(model, share=1.0):
    """Non-reentrant gradient checkpointing of the vision blocks and of round(share x L) of the L decoder
    layers, spread evenly (1: all): the others keep their activations, so the backward pass recomputes that
    share of the decoder's forward and memory grows by one layer's activations per layer left out."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = model.model.language_model.layers
    n, k = len(layers), round(share * len(layers))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = (i + 1) * k // n > i * k // n


def sdpa_shared_kv(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """HF's SDPA attention (the same masks, causality and scale), except that a key/value head serves its group of
    query heads inside the kernel (enable_gqa). HF copies every K/V head once per query head whenever a padding mask is
    given, because CUDA's fused kernels take no mask with shared heads; the CPU kernel does, and the copies cost a
    third of a CPU decoding step (the whole KV cache copied at every layer and token). load_model uses it on CPU."""
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = q_len > 1 and attention_mask is None and (getattr(module, "is_causal", True) if is_causal is None else is_causal)
    if is_causal and kv_len > q_len:  # prefill into an empty static cache: only the first q_len keys exist
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                           scale=scaling, is_causal=is_causal,
                                                           enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def use_shared_kv_attention(model):
    """Switch a loaded HF model (language and vision parts) to sdpa_shared_kv; set_attn_implementation("sdpa") undoes it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("sdpa_shared_kv", sdpa_shared_kv)
    AttentionMaskInterface.register("sdpa_shared_kv", sdpa_mask)  # the masks HF builds for "sdpa"
    model.set_attn_implementation("sdpa_shared_kv")
    return model


def write_model_files(model, processor, folder, state_dict=None):
    """save_pretrained of model and processor into an existing folder, plus the classic
    preprocessor_config.json / video_preprocessor_config.json that some loaders still look for."""
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(folder)
    for part in ("image_processor", "video_processor"):
        if getattr(processor, part, None) is not None:
            getattr(processor, part).save_pretrained(folder)


# ------------------------------------------------------------------------------------------
# Loading, encoding, log-probs


def check_model_dir(path):
    """Cheap checks of a local model folder before anything loads: FileNotFoundError / ValueError."""
    path = str(path)
    local = Path(path)
    if (local.exists() or path.startswith((".", "/"))) and not (local / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (missing config.json)")
    if local.is_dir() and not any((local / name).is_file() for name in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise ValueError(f"{path}: no tokenizer files for its processor (tokenizer.json or vocab.json)")
    if not local.exists():  # a hub id: in the cache, or a hub that answers (not two minutes of retries offline)
        import socket
        import urllib.parse
        from huggingface_hub import constants, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(path, "config.json"), str):
            return
        host = urllib.parse.urlsplit(constants.ENDPOINT).hostname
        try:
            if constants.HF_HUB_OFFLINE:
                raise OSError("offline mode")
            socket.create_connection((host, 443), timeout=5).close()
        except OSError as e:
            raise FileNotFoundError(f"no model at {path}: not a local folder, not in the Hugging Face cache, and "
                                    f"{host} cannot be reached ({e})") from None


def load_model(path, device="cpu", dtype=None):
    """Model + processor from a local folder or a hub id. dtype None -> float32 weights."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, ProcessorMixin
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model, on stderr, says nothing
    check_model_dir(path)
    path = str(path)
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as e:  # a malformed config.json or tokenizer.json: transformers raises many types
        raise ValueError(f"{path}: cannot load a processor ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:100] if str(e) else ''})") from None
    if not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None:
        # AutoProcessor silently falls back to the bare tokenizer when the processor cannot be built.
        raise ValueError(f"{path}: no multimodal processor (got {type(processor).__name__}; "
                         "need preprocessor_config.json, video_preprocessor_config.json and a tokenizer)")
    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "probe"}]}]
    try:  # every stage renders chats with it: a template that does not compile or raises fails here, in one line
        processor.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception as e:
        raise ValueError(f"{path}: its chat template fails ({type(e).__name__}: {str(e).splitlines()[0][:80]})") from None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report of missing weights would come before our one line about them
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32, output_loading_info=True)
    except Exception as e:  # a truncated or foreign weights file: one line, not a traceback
        raise ValueError(f"{path}: cannot load the weights ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    for what in ("missing", "unexpected", "mismatched"):  # HF would start such weights at random, with a warning
        if info.get(f"{what}_keys"):
            keys = sorted(map(str, info[f"{what}_keys"]))
            raise ValueError(f"{path}: {len(keys)} {what} weight(s) in the checkpoint, e.g. {keys[0]}")
    cli.require_finite(dict(model.named_parameters()), f"{path}: the weights")
    rows = model.get_input_embeddings().num_embeddings
    if len(processor.tokenizer) > rows:  # a token id past the embedding would fail deep inside the first forward
        raise ValueError(f"{path}: its tokenizer has {len(processor.tokenizer)} tokens, its embedding {rows} rows")
    model.to(device)
    if torch.device(device).type == "cpu":
        use_shared_kv_attention(model)
    tok = processor.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, processor


def load_teacher(path, processor, device, dtype, url=None, retries=4, probe="", vocab_size=None, timeout_seconds=600.0):
    """The frozen teacher: a model loaded here, or with `url` a vLLM server's client (chat_api.ServedTeacher),
    checked now to tokenize the text `probe` as the student's tokenizer does. The teacher must share the student's
    tokenizer and output vocabulary (`vocab_size` rows of the student's head; its size and depth are free).
    ValueError / EndpointError with one line on a mismatch."""
    if url:
        teacher = chat_api.ServedTeacher(url, path, timeout_seconds, retries=retries, vocab_size=vocab_size)
        teacher.check_tokenizer(processor.tokenizer, [probe])
        return teacher
    teacher, teacher_processor = load_model(path, device, dtype)
    if teacher_processor.tokenizer.get_vocab() != processor.tokenizer.get_vocab():
        raise ValueError(f"teacher {path} has a different tokenizer from the student")
    if vocab_size is not None and teacher.lm_head.out_features != vocab_size:
        raise ValueError(f"teacher {path} scores {teacher.lm_head.out_features} tokens, the student {vocab_size}: "
                         "the two output vocabularies must be the same")
    return teacher.requires_grad_(False).eval()


def load_image(image):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not Path(image).is_file():
        raise FileNotFoundError(f"image not found: {image}")
    with Image.open(image) as im:
        return im.convert("RGB")


def message_images(messages):
    """The images of a chat, in order (entries {"type": "image", "image": path or PIL})."""
    images = []
    for m in messages:
        if isinstance(m["content"], list):
            images += [load_image(c["image"]) for c in m["content"] if c.get("type") == "image"]
    return images


def encode_prompts(processor, messages_list, device="cpu"):
    """A left-padded batch of chat prompts on `device`: input_ids, attention_mask, mm_token_type_ids and,
    when any prompt has an image, pixel_values + image_grid_thw."""
    texts = [processor.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in messages_list]
    images = [im for m in messages_list for im in message_images(m)]
    batch = dict(processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt"))
    batch.setdefault("mm_token_type_ids", torch.zeros_like(batch["input_ids"]))
    return {k: v.to(device) for k, v in batch.items()}


def take_prompts(batch, ix):
    """Rows `ix` of an encode_prompts batch, as encode_prompts would have made them alone: the left padding none
    of them needs is dropped, and pixel_values / image_grid_thw keep their images (one grid row per image, its
    patches in order; every image has merge² patches per token, a token being an mm_token_type_ids 1)."""
    rows = torch.as_tensor(ix, device=batch["input_ids"].device)
    first = int(batch["attention_mask"][rows].sum(0).nonzero()[0])
    out = {k: batch[k][rows, first:] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "image_grid_thw" in batch:
        grids = batch["image_grid_thw"]
        patches = torch.cat([grids.new_zeros(1), grids.prod(-1).cumsum(0)])  # pixel_values rows of image i: patches[i:i+1]
        image_tokens = (batch["mm_token_type_ids"] == 1).sum(1)
        tokens = image_tokens.cumsum(0) * (patches[-1] // image_tokens.sum())  # patches of the images of rows <= r
        images = torch.searchsorted(patches, torch.cat([tokens.new_zeros(1), tokens]))  # first image of each row
        chosen = [i for r in ix for i in range(int(images[r]), int(images[r + 1]))]
        if chosen:
            out["image_grid_thw"] = grids[chosen]
            out["pixel_values"] = torch.cat([batch["pixel_values"][int(patches[i]):int(patches[i + 1])] for i in chosen])
    return out


def vision_token_ids(processor):
    """Ids that must never be sampled: the vision special tokens."""
    tok = processor.tokenizer
    names = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    ids = [tok.convert_tokens_to_ids(n) for n in names]
    return [i for i in ids if i is not None and i != tok.unk_token_id]


def unsampled_token_ids(processor, vocab_size):
    """Ids no decoder may produce: the vision special tokens, and the embedding rows past the
    tokenizer (vocabulary padding: 267 rows in Qwen3-VL, up to 63 in our tiny models). Every
    decoding path (HF generate, vLLM, rollouts and evaluation) bans this same set."""
    return sorted(set(vision_token_ids(processor)) | set(range(len(processor.tokenizer), vocab_size)))


def token_logprobs(logits, token_ids):
    """log softmax(logits)[token] without materialising the full log-softmax:
    gathered logit - logsumexp, in float32."""
    picked = logits.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1).float()
    return picked - torch.logsumexp(logits.float(), dim=-1)


def _head_logprobs(hidden, head, token_ids, temperature):
    return token_logprobs(head(hidden) / temperature, token_ids)


def chunked_logprobs(hidden, head, token_ids, chunk=1024, temperature=1.0):
    """token_logprobs(head(hidden) / T, token_ids) for hidden [N, H], `chunk` rows at a time: the
    [N, vocab] logits never exist whole (a chunk's are recomputed in the backward pass), so a 151,936-token
    head costs O(chunk x vocab) memory instead of O(N x vocab). N <= chunk: one chunk, kept for the backward
    pass (recomputing it would hold the same logits at the same moment, the backward's start). Float32 result [N]."""
    if len(token_ids) == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    grad = torch.is_grad_enabled() and len(token_ids) > chunk
    return torch.cat([checkpoint(_head_logprobs, hidden[i:i + chunk], head, token_ids[i:i + chunk], temperature,
                                 use_reentrant=False) if grad else
                      _head_logprobs(hidden[i:i + chunk], head, token_ids[i:i + chunk], temperature)
                      for i in range(0, len(token_ids), chunk)])


def response_inputs(prompt_batch, response_ids, response_mask):
    """Model inputs of the sequence [left-padded prompt P | right-padded response R]: the token at
    P+j is predicted from position P+j-1, so positions [P-1, P+R-1) predict the response."""
    response_mask = response_mask.to(prompt_batch["attention_mask"].dtype)
    extra = {k: v for k, v in prompt_batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    mm = prompt_batch.get("mm_token_type_ids")
    mm = torch.zeros_like(prompt_batch["input_ids"]) if mm is None else mm
    return dict(input_ids=torch.cat([prompt_batch["input_ids"], response_ids.masked_fill(response_mask == 0, 0)], 1),
                attention_mask=torch.cat([prompt_batch["attention_mask"], response_mask], 1),
                mm_token_type_ids=torch.cat([mm, torch.zeros_like(response_ids)], 1), use_cache=False, **extra)


def response_hidden(model, prompt_batch, response_ids, response_mask):
    """Last hidden states [B, R, H] of the positions that predict the response tokens (the caller
    applies the output head, a chunk at a time)."""
    P, R = prompt_batch["input_ids"].shape[1], response_ids.shape[1]
    out = model.model(**response_inputs(prompt_batch, response_ids, response_mask))
    return out.last_hidden_state[:, P - 1:P + R - 1]


def response_logprobs(model, prompt_batch, response_ids, response_mask, temperature=1.0, chunk=1024):
    """Log-prob of each response token, [B, R] (0 on padding positions), of logits / the sampling
    temperature, as the reference computes them (a no-op at T 1). The head runs on the kept positions
    only, `chunk` at a time (chunked_logprobs). An FSDP-sharded model goes through its own forward (its
    root's weights are gathered only there), with logits for the R + 1 last positions."""
    from torch.distributed.fsdp import FSDPModule

    keep = response_mask.bool()
    if isinstance(model, FSDPModule):
        out = model(**response_inputs(prompt_batch, response_ids, response_mask), logits_to_keep=response_ids.shape[1] + 1)
        return token_logprobs(out.logits[:, :-1] / temperature, response_ids) * keep
    hidden = response_hidden(model, prompt_batch, response_ids, response_mask)
    picked = chunked_logprobs(hidden[keep], model.lm_head, response_ids[keep], chunk, temperature)
    return torch.zeros(keep.shape, dtype=picked.dtype, device=picked.device).masked_scatter(keep, picked)


SERVED_TAIL_FLOOR = 1e-5


def served_tail(top_logprobs):
    """log p_T(tail) [B, R] of a served teacher, which returns only its top-K log-probs [B, R, K]: 1 − Σ exp(top)
    in float64, at least SERVED_TAIL_FLOOR. The server's log-probs are fp32 log-softmax values, each off by at
    most a few ulps of the logits' scale (|logit| ≤ 64: ≤ 8e-6), so 1 − Σ exp(top) is never below the true tail
    by more than 1e-5 (Σ_v p_v(e^ε − 1) ≤ e^ε − 1); a top-1 log-prob that rounded to 0 leaves a tail of 0,
    hence the floor. A tail below 1e-5 is not resolved: its term is then that of a teacher tail of 1e-5, smaller
    than the true one (p log(p/q) falls as q grows), so the loss stays below the coarsened KL's."""
    tail = 1 - top_logprobs.double().exp().sum(-1)
    return tail.clamp(min=SERVED_TAIL_FLOOR).log().to(top_logprobs.dtype)


def served_teacher_scores(teacher, prompt_batch, response_ids, response_mask, topk):
    """A served teacher's ℓ_T [B, R] (and, with topk, its top-k ids and log-probs [B, R, k] and log p_T(tail) [B, R],
    served_tail) of the student's exact response ids after the exact prompt ids the in-process teacher would read."""
    prompts = [row[m.bool()].tolist() for row, m in zip(prompt_batch["input_ids"], prompt_batch["attention_mask"])]
    responses = [row[m.bool()].tolist() for row, m in zip(response_ids, response_mask)]
    scored = teacher.score([p + r for p, r in zip(prompts, responses)], [len(p) for p in prompts], topk)
    device, keep = response_ids.device, response_mask.bool()
    picked = torch.zeros(response_mask.shape, device=device)
    picked[keep] = torch.tensor([x for lps, _ in scored for x in lps], device=device)
    if not topk:
        return picked
    K = min(len(top) for _, tops in scored for top in tops)
    top_ids = torch.zeros(*response_mask.shape, K, dtype=torch.long, device=device)
    top_lp = torch.zeros(*response_mask.shape, K, device=device)
    rows = [sorted(top.items(), key=lambda kv: -kv[1])[:K] for _, tops in scored for top in tops]
    top_ids[keep] = torch.tensor([[t for t, _ in r] for r in rows], dtype=torch.long, device=device).reshape(-1, K)
    top_lp[keep] = torch.tensor([[lp for _, lp in r] for r in rows], device=device).reshape(-1, K)
    return picked, top_ids, top_lp, served_tail(top_lp)


@torch.no_grad()
def teacher_topk(hidden, head, tokens, mask, k, chunk=256, temperature=1.0):
    """The in-process teacher's (ℓ_T of each response token [B, R], its top-k ids and log-probs [B, R, k], and the
    log-prob of the rest, log Σ_{v∉top k} p_T(v) [B, R], a log-sum-exp: exact however confident the teacher), from
    its last hidden states, `chunk` positions at a time. The log-softmax runs in float64 (no gradient here): an fp32
    one shifts every log-prob by its rounded normaliser (~5e-7), which a served teacher's 1 − Σ top does not see."""
    keep = mask.bool()
    h, ids = hidden[keep], tokens[keep]
    picked, top_lp, top_ids, tails = [], [], [], []
    for i in range(0, len(ids), chunk):
        log_q = torch.log_softmax(head(h[i:i + chunk]).double() / temperature, -1)
        values, indices = log_q.topk(min(k, log_q.shape[-1]), -1)
        picked.append(log_q.gather(-1, ids[i:i + chunk, None]).squeeze(-1).float())
        top_lp.append(values.float())
        top_ids.append(indices)
        tails.append(log_q.scatter(-1, indices, float("-inf")).logsumexp(-1).float())
    K = min(k, head.out_features)
    out = [torch.zeros(mask.shape, device=mask.device), torch.zeros(*mask.shape, K, dtype=torch.long, device=mask.device),
           torch.zeros(*mask.shape, K, device=mask.device), torch.zeros(mask.shape, device=mask.device)]
    for full, parts in zip(out, (picked, top_ids, top_lp, tails)):
        if parts:
            full[keep] = torch.cat(parts)
    return tuple(out)


def generate_responses(model, processor, messages_list, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None,
                       cache="dynamic", prompts=None):
    """One response per chat with HF generate (greedy at temperature 0), vision tokens never sampled, as
    vllm_generate returns them: token_ids (up to and including the first end-of-turn token), logprobs
    (None), text, finished. The model runs in eval mode (HF turns the KV cache off under gradient
    checkpointing in train mode); an FSDP2 model is gathered, every rank running the same forwards.
    cache "static": a preallocated KV cache, with which HF compiles the decoding step on GPU (CUDA graphs:
    no per-kernel launch cost); the same tokens as "dynamic". prompts: the chats already encoded (encode_prompts)."""
    from torch.distributed.fsdp import FSDPModule

    if not messages_list:
        return []
    batch = encode_prompts(processor, messages_list, model.device) if prompts is None else prompts
    eos = model.generation_config.eos_token_id  # a response ends at <|im_end|> or one of the model's own ids
    eos = {processor.tokenizer.convert_tokens_to_ids("<|im_end|>"), *(eos if isinstance(eos, list) else [eos] if eos else [])}
    sharded, was_training = isinstance(model, FSDPModule), model.training
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else {"do_sample": False}
    if seed is not None:
        torch.manual_seed(seed)
    model.eval()
    if sharded:
        model.unshard()  # generate runs the vision tower (root-owned weights) before any root forward
    out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos), synced_gpus=sharded,
                         cache_implementation=None if cache == "dynamic" else cache,
                         pad_token_id=processor.tokenizer.pad_token_id, **sampling,
                         suppress_tokens=unsampled_token_ids(processor, model.config.get_text_config().vocab_size))
    if sharded:
        model.reshard()
    model.train(was_training)
    results = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        end = next((j for j, t in enumerate(row) if t in eos), None)
        ids = row if end is None else row[:end + 1]
        results.append(dict(token_ids=ids, logprobs=None, text=processor.tokenizer.decode(ids, skip_special_tokens=True),
                            finished=end is not None))
    return results


# ------------------------------------------------------------------------------------------
# vLLM: one in-process engine per rank, for rollouts (opcd.py) and evaluation (evaluate.py).
# vllm is imported lazily: everything above works without it.
#   llm = make_llm(path, seed=0, max_model_len=4096)          # under torchrun: one engine per rank
#   outs = vllm_generate(llm, processor, messages_list, max_new_tokens=256, temperature=1.0, logprobs=True)
#   push_weights(llm, model)                                   # after every optimiser step


@torch.no_grad()
def sample_responses(backend, model, llm, processor, messages_list, max_new_tokens, temperature, top_p, seeds,
                     hf_cache="dynamic", prompts=None):
    """One sampled response per chat: dicts with token_ids (up to and including the first end-of-turn token),
    text, finished, logprobs (vLLM's log-prob of each sampled token; None from HF). prompts: the chats encoded,
    which HF generate reads instead of encoding them again."""
    if backend == "vllm":
        return vllm_generate(llm, processor, messages_list, max_new_tokens, temperature, top_p, seeds, logprobs=True)
    return generate_responses(model, processor, messages_list, max_new_tokens, temperature, top_p,
                              seeds[0] if seeds else None, hf_cache, prompts)


def pad_responses(responses, pad_id, device):
    """Right-padded [B, R] response ids and mask (1 on every kept token, end-of-turn included)."""
    R = max([len(r["token_ids"]) for r in responses] + [1])
    ids = torch.full((len(responses), R), pad_id, dtype=torch.long)
    mask = torch.zeros(len(responses), R)
    for i, r in enumerate(responses):
        ids[i, :len(r["token_ids"])] = torch.tensor(r["token_ids"], dtype=torch.long)
        mask[i, :len(r["token_ids"])] = 1
    return ids.to(device), mask.to(device)


def vllm_available():
    return importlib.util.find_spec("vllm") is not None


def make_llm(path, seed=0, max_model_len=4096, dtype="float32", kv_cache_bytes=256 << 20, gpu_memory_utilization=0.3,
             max_images=1):
    """An in-process vLLM engine for the model folder `path`. Under torchrun every rank gets its own engine
    (external_launcher), and all ranks must call generate equally often. The KV cache is sized in bytes on CPU,
    by gpu_memory_utilization on GPU (with sleep mode, see llm_sleep). The caller's torch RNG state is kept."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: weights can be handed over directly
    # errors only (export VLLM_LOGGING_LEVEL=INFO for more): on CPU vLLM warns once a step that it cannot set the
    # thread count, 4,920 of the main job's 5,425 lines
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from vllm import LLM

    cuda = torch.cuda.is_available()
    kwargs = dict(model=str(path), dtype=dtype, enforce_eager=not cuda, max_model_len=max_model_len, seed=seed,
                  limit_mm_per_prompt={"image": max_images, "video": 0})
    if cuda:
        kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
    else:
        # No chunked prefill on CPU: vLLM rewinds the generator of a seeded request whose prompt was cut
        # across steps, which a CPU generator cannot do (RuntimeError at > 4,096 prompt tokens a call).
        kwargs.update(kv_cache_memory_bytes=kv_cache_bytes, enable_chunked_prefill=False,
                      max_num_batched_tokens=max(4096, max_model_len))
        # = TORCH_COMPILE_DISABLE=1: no first-request compile of a sampler helper (needs a C compiler, +5-20 s)
        torch._dynamo.config.disable = True
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        kwargs.update(distributed_executor_backend="external_launcher", data_parallel_size=world_size)
    rng = torch.get_rng_state()
    llm = LLM(**kwargs)
    torch.set_rng_state(rng)
    return llm


def close_llm(llm):
    """Shut the engine down; this also drops vLLM's process groups (call before compute_cleanup)."""
    llm.llm_engine.engine_core.shutdown()


def hf_state_dict(model):
    """The model's weights under Hugging Face names, LoRA layers merged (W + alpha/r * B @ A),
    without modifying the model."""
    sd = {}
    lora = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if ".lora_A" in key or ".lora_B" in key:
            continue
        owner = module[: -len(".base_layer")] if module.endswith(".base_layer") else None
        if owner in lora:
            m = lora[owner]
            if leaf == "weight":
                value = (value.float() + m.delta()).to(value.dtype)
            key = f"{owner}.{leaf}"
        sd[key] = value.detach()
    return sd


def llm_sleep(llm):
    """Free the engine's GPU memory (KV cache and weights: vLLM sleep level 2) while the trainer works;
    push_weights wakes it. A no-op on CPU, where vLLM has no sleep mode and the KV cache is small."""
    if torch.cuda.is_available():
        llm.sleep(level=2)


def push_weights(llm, model):
    """Copy the trainer's current weights into the engine, then drop every cache computed with
    the old ones: prefix (KV) cache, multimodal processor cache and encoder (vision) cache. A sleeping
    engine (llm_sleep) gets its weight memory back first and its KV cache after the copy."""
    asleep = torch.cuda.is_available() and llm.llm_engine.is_sleeping()
    if asleep:
        llm.wake_up(tags=["weights"])
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(hf_state_dict(model).items())})
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()  # without it a seen image fails with "Encoder cache miss"
    if asleep:
        llm.wake_up(tags=["kv_cache"])


def vllm_prompts(processor, messages_list):
    """vLLM prompt dicts: the chat template text plus the images (PIL) of each chat."""
    prompts = []
    for messages in messages_list:
        prompt = {"prompt": processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)}
        images = message_images(messages)
        if images:
            prompt["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
        prompts.append(prompt)
    return prompts


def vllm_allowed_token_ids(llm, processor):
    """The engine's vocabulary minus unsampled_token_ids, as SamplingParams.allowed_token_ids wants
    it; computed once per engine (a 151k-id list for Qwen3-VL)."""
    if getattr(llm, "_mgsd_allowed", None) is None:
        vocab_size = llm.llm_engine.model_config.get_vocab_size()
        banned = set(unsampled_token_ids(processor, vocab_size))
        llm._mgsd_allowed = [i for i in range(vocab_size) if i not in banned]
    return llm._mgsd_allowed


def vllm_generate(llm, processor, messages_list, max_new_tokens=256, temperature=0.0, top_p=1.0, seeds=None,
                  logprobs=False):
    """One response per chat (greedy when temperature is 0); vision tokens are never sampled.
    seeds: one int per chat (reproducible sampling) or None. Returns one dict per chat:
    token_ids (ending with the end-of-turn token when finished), logprobs (the model's raw
    log-prob of each sampled token, or None), text, finished."""
    from vllm import SamplingParams

    allowed = vllm_allowed_token_ids(llm, processor)
    stop = [processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]  # besides the model's own end-of-sequence ids
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=0,
                             seed=None if seeds is None else int(seeds[i]), allowed_token_ids=allowed, stop_token_ids=stop,
                             logprobs=0 if logprobs else None, skip_special_tokens=True)
              for i in range(len(messages_list))]
    outs = llm.generate(vllm_prompts(processor, messages_list), params, use_tqdm=False)  # [] too: ranks in lockstep
    return [dict(token_ids=list(c.token_ids), text=c.text, finished=c.finish_reason == "stop",
                 logprobs=[d[t].logprob for d, t in zip(c.logprobs, c.token_ids)] if logprobs else None)
            for c in (out.outputs[0] for out in outs)]


def start_server(path, name, max_model_len=4096, max_logprobs=20, kv_cache_bytes=1 << 30, timeout_seconds=600):
    """`vllm serve` of the model folder `path` as `name` on a free port of 127.0.0.1, in its own process (the
    served teacher of opcd.py --teacher-url on this machine: the main job, the benches, the tests). Returns
    (process, URL of its /v1) once it answers; the caller terminates the process. On CPU: fp32, no chunked
    prefill, a KV cache of kv_cache_bytes."""
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len), "--max-logprobs",
           str(max_logprobs), "--uvicorn-log-level", "warning"]
    if not torch.cuda.is_available():
        cmd += ["--dtype", "float32", "--enforce-eager", "--no-enable-chunked-prefill", "--max-num-batched-tokens",
                str(max(4096, max_model_len)), "--kv-cache-memory-bytes", str(kv_cache_bytes)]
    log = tempfile.TemporaryFile("w+")  # not a pipe: a server that logs much would block on a full one
    proc = subprocess.Popen(cmd, env={"VLLM_LOGGING_LEVEL": "ERROR", **os.environ}, stdout=log, stderr=log, text=True)
    url, deadline = f"http://127.0.0.1:{port}/v1", time.time() + timeout_seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/models", timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"vllm serve {path} exited: {log.read()[-2000:]}") from None
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"vllm serve {path} did not answer in {timeout_seconds} s")


# ------------------------------------------------------------------------------------------
# The training loops' plumbing (opcd.py; micro_batches also sft.py): data order, sampling seeds,
# micro-batches, validation, the log line


def batch_rows(rows, step, batch_size, seed, rank, world_size):
    """This rank's share of the global batch of `step`: epochs are fresh permutations seeded by
    (seed, epoch), so the data position is a function of the step alone."""
    per_epoch = len(rows) // batch_size
    epoch, i = divmod(step, per_epoch)
    order = list(range(len(rows)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    chosen = order[i * batch_size:(i + 1) * batch_size]
    return [rows[j] for j in chosen[rank::world_size]]


def sample_seed(seed, step, rank, i, salt=0):
    return (seed * 1_000_003 + step * 10_007 + rank * 101 + i + salt) % (2**31)


def micro_batches(keys, size):
    """A step's rows (indices) in micro-batches of `size` rows of similar keys (a key ends with the row's length):
    the least padding in every forward and backward; a loss summed over the step's tokens does not depend on the
    grouping (opcd.py, sft.micro_batches)."""
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return [order[i:i + size] for i in range(0, len(order), size)]


@torch.no_grad()
def validate(args, step, val_rows, model, llm, processor, rank, world_size):
    """Sampled validation (T 0.6, top-p 0.95) of the student on its share of the val split; returns the
    log entries val_macro_success and val_<task>_success over all ranks' episodes."""
    if args.fsdp:  # sharded forwards run in lockstep: every rank needs as many rows as the others, per call
        val_rows = val_rows[:len(val_rows) // world_size * world_size]
    mine, chunk = val_rows[rank::world_size], max(1, args.batch_size // world_size)
    calls = math.ceil(math.ceil(len(val_rows) / world_size) / chunk)  # the same on every rank (vLLM lockstep)
    episodes = []
    for c in range(calls):
        rows = mine[c * chunk:(c + 1) * chunk]
        prompts = [envs.student_messages(r["state"], r["image"], args.image_prompt == "direct") for r in rows]
        outs = sample_responses(args.rollout, model, llm, processor, prompts,
                       args.max_new_tokens, args.val_temperature, args.val_top_p,
                       [sample_seed(args.seed, step, rank, c * chunk + i, salt=7_777_777) for i in range(len(rows))],
                       args.hf_cache)
        episodes += [dict(task=r["task"], level=r["level"], error=False, **envs.score_planning(r["state"], o["text"]))
                     for r, o in zip(rows, outs)]
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, episodes)
        episodes = [e for part in gathered for e in part]
    agg = envs.aggregate(episodes)
    return {"val_macro_success": agg["macro"]["success"], **{f"val_{t}_success": v["success"]
                                                             for t, v in agg["per_task"].items()}}


def step_log(args, step, responses, scores, student_lps, stats, times, device):
    """opcd.py's log line of a step, summed over ranks; `stats` holds the step's sums (KL, loss, tokens) and its global
    values (success, gradient norm). vllm_logprob_diff: mean |ℓ from vLLM − ℓ from the trainer| over the
    sampled tokens (weights in sync: ~1e-6 in fp32)."""
    drift, drift_tokens = 0.0, 0
    for o, lp in zip(responses, student_lps):
        if o["logprobs"] is not None:
            k = len(o["token_ids"])
            drift, drift_tokens = drift + (torch.tensor(o["logprobs"]) - lp[:k]).abs().sum().item(), drift_tokens + k
    sums = optim.global_sum([stats["kl_sum"], stats["loss_sum"], drift, drift_tokens, sum(s["parse_ok"] for s in scores),
                       sum(envs.last_answer_block(o["text"]) is not None for o in responses),
                       sum(len(o["token_ids"]) for o in responses), sum(not o["finished"] for o in responses)], device)
    seconds, B = [b - a for a, b in zip(times, times[1:])], args.batch_size * args.samples_per_prompt
    return {"step": step + 1, "reverse_kl": sums[0] / stats["n_tokens"], "loss": sums[1], "success": stats["success"],
            "parse_rate": sums[4] / B, "format_rate": sums[5] / B, "response_tokens": sums[6] / B,
            "truncated_rate": sums[7] / B, "vllm_logprob_diff": sums[2] / sums[3] if sums[3] else None,
            "grad_norm": stats["grad_norm"], "lr": args.lr, "seconds_rollout": seconds[0], "seconds_teacher": seconds[1],
            "seconds_train": seconds[2], "samples_per_second": B / sum(seconds)}
