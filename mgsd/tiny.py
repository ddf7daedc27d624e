"""The tiny stand-in for an instruct VLM, built offline: the model factory, and the writer of its generic picture
splits (mgsd/grids.py).

`build_model` writes a random Qwen3VLForConditionalGeneration of a configurable size with a byte-level BPE
trained on the project's own text (TOKENIZER_SPLIT) and a Qwen-style chat template: an ordinary HF folder
that transformers and vLLM load. Images have one fixed size (min = max pixels: never resized, so HF and vLLM
agree on the image tokens, one per 32x32 pixels); text head_dim >= 32 (vLLM's CPU attention); the vision
position table gets std 0.5, not HF's 0.02, so that a frozen random tower still says *where* things are.

    python -m mgsd.tiny model --out models/tiny --size tiny      # tests, < 1M parameters
    python -m mgsd.tiny model --out models/small --size small    # 3.5M; the miniature's base: --image-size 160
    python -m mgsd.tiny grids --out data/grids/train --split train --count 20000
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn

import envs
from mgsd import cli, common, splits
from mgsd.grids import GRID_SIZES, draw_grid, grid_answer, grid_prompt, make_grid

SEED_BASE = {split: base for split, (base, _, _) in splits.SPLITS.items()}  # disjoint seed ranges, as the tasks


def grid_row(seed, split, canvas=160, cell=32):
    """(data row, relative image path, picture) of one grid: kind "vision", task "grid"."""
    grid = make_grid(seed, tuple(s for s in GRID_SIZES if s * cell <= canvas))
    image = f"images/grid-{seed:09d}.png"
    state = {"task": "grid", "level": grid["size"], "seed": seed, "question": grid["question"],
             "objects": [[r, c, letter] for (r, c), letter in sorted(grid["objects"].items())]}
    base = {"id": f"grid-{seed:09d}", "task": "grid", "level": grid["size"], "seed": seed, "split": split,
            "state": state, "plan": []}
    row = splits._message_row(base, "vision", envs._user(envs._text(grid_prompt(grid)), {"type": "image", "image": image}),
                            grid_answer(grid), image=image)
    return row, image, draw_grid(grid, canvas, cell)


def write_grids(out_dir, split, count, canvas=160, cell=32):
    """out_dir/data.jsonl + images/, written to a temporary sibling and renamed."""
    if not 1 <= count <= 10 ** 6:
        raise ValueError(f"--count must be at least 1 and at most 1000000, got {count}")
    if cell < 8 or canvas < 3 * cell or canvas > 2048:
        raise ValueError(f"--canvas {canvas} (at most 2048) cannot hold a 3x3 grid of {cell}-pixel cells (at least 8)")
    out = Path(out_dir).absolute()
    if out.exists():
        raise ValueError(f"{out} exists; remove it first")
    with cli.atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "data.jsonl", "w") as f:
            for seed in range(SEED_BASE[split], SEED_BASE[split] + count):
                row, image, picture = grid_row(seed, split, canvas, cell)
                picture.save(tmp / image)
                f.write(splits._disk_row(row) + "\n")
    return out


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]  # Qwen's order

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in item -%}{{- item['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# text: (hidden, layers, heads, kv_heads, head_dim, mlp) ; vision: (hidden, depth, heads, mlp, deepstack layers)
MODEL_SIZES = {
    "tiny": dict(text=(128, 2, 4, 2, 32, 256), vision=(32, 2, 2, 64, (1,))),
    "small": dict(text=(192, 4, 6, 2, 32, 512), vision=(96, 4, 4, 256, (1, 2))),
    "medium": dict(text=(512, 8, 8, 4, 64, 1536), vision=(256, 6, 4, 1024, (2, 4))),
}
TOKENIZER_VOCAB = 2048


def tokenizer_corpus(n_per_level=4):
    """The project's own text: prompts, reference responses, perception answers, teacher
    contexts and text states of a few instances of every task and level, and the generic grid rows (grids.py)."""
    texts = []
    for task in envs.TASKS:
        for level in envs.DEFAULT_LEVELS[task]:
            found, seed = 0, 0
            while found < n_per_level and seed < 50 * n_per_level:
                state = envs.generate(task, level, seed)
                seed += 1
                if state is None:
                    continue
                found += 1
                chats = [envs.student_messages(state, "img.png"), envs.text_student_messages(state),
                         envs.teacher_messages(state), envs.perception_messages(state, "img.png")]
                for chat in chats:
                    for m in chat:
                        content = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
                        texts += [c["text"] for c in content if c.get("type") == "text"]
                texts += [envs.reference_response(state), envs.perception_answer(state), envs.text_state(state)]
    for seed in range(8 * n_per_level):  # the generic grid-reading rows
        grid = make_grid(seed)
        texts += [grid_prompt(grid), grid_answer(grid)]
    return texts


# How the tiny tokenizer cuts text before BPE: digits, newlines, and the single letters of plans and
# text maps ("RDD", "FHFF", "T..") stand alone; everything else may merge across words, so the fixed
# instructions shrink to a few tokens. Measured on the default data: prompts 2.7-3.3x and responses
# 1.5-2x shorter than with Qwen's word-level split, so every stage runs 2-3x faster on CPU.
TOKENIZER_SPLIT = r"\d|\n|[A-Z.](?=[A-Z.<,\n])"


def train_tokenizer(texts, vocab_size=TOKENIZER_VOCAB):
    """A byte-level BPE trained on `texts`, cut by TOKENIZER_SPLIT, as a fast HF tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TOKENIZER_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    bpe.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL_TOKENS])
    return _fast(bpe)


def load_tokenizer(folder):
    """The BPE of a model folder built here, wrapped as train_tokenizer wraps a fresh one."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no tokenizer.json")
    bpe = Tokenizer.from_file(str(path))
    bpe.no_padding()  # a trained model's folder keeps the padding its last generate set; a fresh build has none
    bpe.no_truncation()
    return _fast(bpe)


def _fast(bpe):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  model_max_length=32768, additional_special_tokens=SPECIAL_TOKENS)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(out_dir, size="tiny", seed=0, image_size=128, tokenizer=None):
    """Build and save a random Qwen3VLForConditionalGeneration + processor folder. Returns the path.
    `tokenizer`: a model folder built here whose BPE to keep instead of training one on today's text."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    if Path(out_dir).exists():
        raise ValueError(f"{out_dir} exists; remove it first")
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(MODEL_SIZES)}")
    if image_size < 32 or image_size % 32 or image_size > 2048:
        raise ValueError(f"image_size must be a positive multiple of 32 (one token per 32x32 pixels), at most 2048, "
                         f"got {image_size}")
    tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer(tokenizer_corpus())
    hidden, layers, heads, kv_heads, head_dim, mlp = MODEL_SIZES[size]["text"]
    v_hidden, v_depth, v_heads, v_mlp, deepstack = MODEL_SIZES[size]["vision"]
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # Qwen: 24/20/20 of 64
    vocab_size = (len(tok) + 63) // 64 * 64
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    grid = image_size // 16
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                         max_position_embeddings=4096 + 4096,
                         rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=mrope,
                                              mrope_interleaved=True),
                         tie_word_embeddings=False, pad_token_id=ids["<|endoftext|>"],
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"]),
        vision_config=dict(depth=v_depth, hidden_size=v_hidden, intermediate_size=v_mlp, num_heads=v_heads,
                           out_hidden_size=hidden, num_position_embeddings=grid * grid, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=list(deepstack)),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).float()
    # HF's init gives the vision position table std 0.02 against patch features of std ~0.6, so a random
    # tower would hide where things are; a trained tower carries position strongly, and so must a frozen
    # random one (FrozenLake 3x3, 600 full-SFT steps: the player's row read 1.0 held out with it, 0.65 without).
    nn.init.normal_(model.model.visual.pos_embed.weight, std=0.5)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.bos_token_id = None
    pixels = image_size * image_size  # min = max pixels: a fixed image size, never resized
    image_processor = Qwen2VLImageProcessor(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=16,
                                            temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                            image_std=[0.5] * 3)
    video_processor = Qwen3VLVideoProcessor(size={"shortest_edge": pixels, "longest_edge": pixels * 4},
                                            patch_size=16, temporal_patch_size=2, merge_size=2,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                 chat_template=CHAT_TEMPLATE)
    return common.save_model(model, processor, out_dir)


def main(argv=None):
    parser = cli.Parser(prog="python -m mgsd.tiny", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
    g = sub.add_parser("grids", help="write a split of generic grid-reading rows (kind vision)")
    g.add_argument("--out", required=True, help="output directory (must not exist)")
    g.add_argument("--split", required=True, choices=tuple(SEED_BASE), help="seed range: train / val / test")
    g.add_argument("--count", type=int, required=True, help="number of pictures (one row each)")
    g.add_argument("--canvas", type=int, default=160, help="picture side in pixels (the tiny model's image size)")
    g.add_argument("--cell-size", type=int, default=32, help="cell side in pixels (one merged vision token)")
    m = sub.add_parser("model", help="build a random tiny Qwen3-VL model + processor folder")
    m.add_argument("--out", required=True, help="output model folder")
    m.add_argument("--size", default="tiny", choices=sorted(MODEL_SIZES),
                   help="tiny (<1M, tests), small (3.5M, the miniature), medium (>=30M)")
    m.add_argument("--seed", type=cli.seed, default=0, help="weight initialisation seed")
    m.add_argument("--image-size", type=int, default=128, help="the fixed image side in pixels (multiple of 32)")
    m.add_argument("--tokenizer", default=None, help="keep the tokenizer of this model folder (built here) instead of "
                                                     "training one on the project's text: how the shipped base is rebuilt")
    args = parser.parse_args(argv)
    if args.command == "model" and args.tokenizer and Path(args.tokenizer).resolve() in Path(args.out).resolve().parents:
        cli.fail(f"--out {args.out} lies inside the --tokenizer folder {args.tokenizer}; choose another --out")
    try:
        if args.command == "grids":
            out = write_grids(args.out, args.split, args.count, args.canvas, args.cell_size)
            print(f"wrote {out / 'data.jsonl'}")
            return
        path = build_model(args.out, size=args.size, seed=args.seed, image_size=args.image_size,
                           tokenizer=args.tokenizer)
    except (ValueError, OSError) as e:
        cli.fail(e)
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:  # shapes from the header: no weights are read again
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    vocab = json.loads((path / "config.json").read_text())["text_config"]["vocab_size"]
    print(f"wrote {path} ({args.size}, {n / 1e6:.2f}M parameters, {vocab} vocab)")


if __name__ == "__main__":
    cli.interruptible(main, "nothing written")
