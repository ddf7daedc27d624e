"""The miniature's generic grid-reading rows (mgsd/grids.py, written by mgsd/tiny.py): pictures, answers, scorer,
split folders; the shipped base's answers."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mgsd import grids, splits, tiny

ROOT = Path(__file__).resolve().parents[1]


def test_grid_picture_shows_each_object_at_its_cell():
    for seed in range(30):
        grid = grids.make_grid(seed)
        img = grids.draw_grid(grid)
        assert img.size == (160, 160)
        k = grid["size"]
        for r in range(k):
            for c in range(k):
                assert img.getpixel((c * 32 + 3, r * 32 + 3)) == grids.FLOOR
                letter = grid["objects"].get((r, c))
                centre = img.getpixel((c * 32 + 16, r * 32 + 16))
                if letter is None or letter == "O":  # a ring's centre is floor
                    assert centre == grids.FLOOR
                else:
                    assert centre == grids.OBJECTS[letter][1]
        if k < 5:
            assert {img.getpixel((x, 159)) for x in range(0, 160, 5)} == {grids.PAD}  # outside the grid


def test_every_question_type_and_answer():
    objects = {(0, 1): "T", (2, 2): "C", (1, 0): "T"}
    grid = {"size": 3, "seed": 0, "objects": objects, "question": ["map", None]}
    assert grids.grid_answer(grid) == ".T.\nT..\n..C"
    assert "one letter per cell" in grids.grid_prompt(grid)
    grid["question"] = ["where", "T"]
    assert grids.grid_answer(grid) == "(0, 1), (1, 0)" and "green triangles" in grids.grid_prompt(grid)
    grid["question"] = ["where", "S"]
    assert grids.grid_answer(grid) == "none"
    grid["question"] = ["what", [2, 2]]
    assert grids.grid_answer(grid) == "red circle" and "(2, 2)" in grids.grid_prompt(grid)
    grid["question"] = ["what", [0, 0]]
    assert grids.grid_answer(grid) == "nothing"
    assert {grids.make_grid(seed)["question"][0] for seed in range(3)} == set(grids.QUESTIONS)


def test_grid_scorer_grades_cells_and_answers():
    grid = {"size": 3, "seed": 0, "objects": {(0, 1): "T", (2, 2): "C"}, "question": ["map", None]}
    assert grids.score_grid(grid, ".T.\n...\n..C") == {"all_correct": True, "map": True, "cells": 1.0}
    one_wrong = grids.score_grid(grid, ".T.\n...\n..X")
    assert not one_wrong["map"] and one_wrong["cells"] == pytest.approx(8 / 9)
    assert grids.score_grid(grid, ".T.\n") == {"all_correct": False, "map": False, "cells": pytest.approx(3 / 9)}
    grid["question"] = ["where", "T"]
    assert grids.score_grid(grid, "(0,1)")["where"] and not grids.score_grid(grid, "(1, 0)")["where"]
    grid["question"] = ["what", [2, 2]]
    assert grids.score_grid(grid, " Red circle\n")["what"] and not grids.score_grid(grid, "red ring")["what"]


def test_grid_rows_name_no_task_and_no_plan():
    for seed in range(20):
        row, _, _ = tiny.grid_row(seed, "train")
        text = json.dumps(row["messages"]).lower()
        for word in ("frozenlake", "maze", "minibehaviour", "player", "goal", "plan", "<answer>", "hole", "printer"):
            assert word not in text


def test_grid_split_loads_and_is_scored_by_envs(tmp_path):
    out = tiny.write_grids(tmp_path / "grids", "val", 6)
    rows = splits.load_split(out)
    assert [r["kind"] for r in rows] == ["vision"] * 6 and all(Path(r["image"]).is_file() for r in rows)
    assert all(splits.score_row(r, r["answer"])["all_correct"] for r in rows)
    import evaluate

    summary = evaluate.main(["--model", "oracle", "--backend", "oracle", "--data", str(out), "--kind", "vision",
                             "--out", str(tmp_path / "eval")])
    assert summary["conditions"]["image"]["per_task"]["grid"]["cells"] == 1.0
    assert summary["conditions"]["image"]["per_task"]["grid"]["all_correct"] == 1.0
    proc = subprocess.run([sys.executable, "-m", "mgsd.tiny", "grids", "--out", str(out), "--split", "val",
                           "--count", "2"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "exists" in proc.stderr


BASE = ROOT / "models" / "mini-base"


def evaluate_both_backends(args, out):
    """Greedy episodes of evaluate.py with the HF backend (in-process) and with vLLM (a subprocess)."""
    import evaluate

    evaluate.main([*map(str, args), "--backend", "hf", "--out", str(out / "hf")])
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TORCH_COMPILE_DISABLE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args), "--backend", "vllm",
                           "--out", str(out / "vllm")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [[json.loads(line) for line in (out / name / "episodes.jsonl").read_text().splitlines()] for name in ("hf", "vllm")]


def test_the_base_is_rebuilt_with_the_shipped_tokenizer(tmp_path):
    """`pipeline.py --pretrain` keeps the shipped base's BPE (trained on the prompts of its day; MiniBehaviour's
    picture legend changed since), so that the rebuild is the shipped base; a fresh BPE today would differ."""
    import pipeline

    built = tiny.build_model(tmp_path / "model", size="tiny", tokenizer=BASE)
    saved, shipped = (json.loads((folder / "tokenizer.json").read_text()) for folder in (built, BASE))
    assert saved["model"] == shipped["model"] and saved["added_tokens"] == shipped["added_tokens"]
    # the shipped folder keeps the left padding of its last generate; a build starts without, as a fresh BPE does
    assert shipped["padding"]["direction"] == "Left" and saved["padding"] is None and saved["truncation"] is None
    fresh = json.loads(tiny.train_tokenizer(tiny.tokenizer_corpus()).backend_tokenizer.to_str())
    assert fresh["model"]["merges"] != shipped["model"]["merges"]
    init = pipeline.pretrain_commands(tmp_path / "base", 8)[0][0]
    assert init[init.index("--tokenizer") + 1] == pipeline.SHIPPED_BASE
    assert "--tokenizer" not in pipeline.pretrain_commands(tmp_path / "quick", 8, quick=True)[0][0]


def test_shipped_base_reads_pictures_and_plans_from_text_alike_in_hf_and_vllm(tmp_path):
    """models/mini-base loads in transformers and vLLM, both see a 160-px picture as 25 tokens and give the
    same greedy answers, and the answers are right: held-out grid pictures read, text-state plans solved."""
    from PIL import Image

    from mgsd import common

    model, processor = common.load_model(BASE)
    assert sum(p.numel() for p in model.parameters()) < 5e6
    thw = processor.image_processor(images=[Image.new("RGB", (160, 160))], return_tensors="pt")["image_grid_thw"]
    assert thw.tolist() == [[1, 10, 10]]  # 10 x 10 patches of 16 px, merged 2 x 2: one token per 32-px cell
    grid_dir = tiny.write_grids(tmp_path / "grids", "test", 12)
    hf, vllm = evaluate_both_backends(["--model", BASE, "--data", grid_dir, "--kind", "vision", "--max-new-tokens", 40],
                                      tmp_path / "vision")
    assert [e["response"] for e in hf] == [e["response"] for e in vllm]
    assert sum(e["metrics"]["all_correct"] for e in hf) >= 10
    text = splits.make_split(tmp_path / "text", "test", 3, levels={"frozenlake": [4], "maze": [3], "minibehaviour": [5]},
                           kinds=("planning",), image_size=160, cell_size=32)
    hf, vllm = evaluate_both_backends(["--model", BASE, "--data", text, "--condition", "both", "--max-new-tokens", 100],
                                      tmp_path / "planning")
    assert [e["response"] for e in hf] == [e["response"] for e in vllm]
    success = {c: sum(e["metrics"]["success"] for e in hf if e["condition"] == c) for c in ("image", "text")}
    assert success["text"] >= 5 and success["image"] <= success["text"] - 3  # of 9: it plans from text, not pictures
