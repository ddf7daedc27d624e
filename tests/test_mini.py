"""The miniature's generic grid-reading rows (tiny.py): pictures, answers, scorer, split folders."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import envs
import tiny

ROOT = Path(__file__).resolve().parents[1]


def test_grid_picture_shows_each_cells_background_and_filled_shape():
    for seed in range(30):
        grid = tiny.make_grid(seed)
        img = tiny.draw_grid(grid)
        assert img.size == (160, 160)
        k = grid["size"]
        for r in range(k):
            for c in range(k):
                background = tiny.COLOURS[grid["background"][r][c]]
                assert img.getpixel((c * 32 + 1, r * 32 + 1)) == background
                letter, colour = grid["shapes"].get((r, c), (".", None))
                centre = img.getpixel((c * 32 + 16, r * 32 + 16))
                if letter in "CST":  # filled shapes cover the cell centre
                    assert centre == tiny.COLOURS[colour]
                elif letter == ".":
                    assert centre == background
        assert {img.getpixel((x, 159)) for x in range(0, 160, 5) if k < 5} <= {tiny.PAD}  # outside the grid


def test_grid_answer_lists_what_the_grid_holds():
    grid = {"size": 3, "seed": 0, "background": [["white", "white", "navy"], ["white", "navy", "white"],
                                                 ["white", "white", "white"]],
            "shapes": {(0, 1): ("T", "red"), (2, 2): ("C", "red"), (1, 0): ("O", "green")},
            "ask_shape": "red", "ask_background": "navy"}
    assert tiny.grid_answer(grid) == "1. 3x3\n2.\n.T.\nO..\n..C\n3. (0, 1), (2, 2)\n4. (0, 2), (1, 1)"
    assert "What is the grid size?" in tiny.grid_prompt(grid) and "red shapes" in tiny.grid_prompt(grid)


def test_grid_scorer_grades_cells_and_questions():
    grid = tiny.make_grid(3)
    answer = tiny.grid_answer(grid)
    perfect = tiny.score_grid(grid, answer)
    assert perfect["all_correct"] and perfect["cells"] == 1.0
    k = grid["size"]
    lines = answer.split("\n")
    row = lines[2]
    lines[2] = ("X" if row[0] != "X" else "C") + row[1:]  # one wrong letter in row 0
    one_wrong = tiny.score_grid(grid, "\n".join(lines))
    assert not one_wrong["shape_map"] and one_wrong["cells"] == pytest.approx(1 - 1 / k**2)
    assert one_wrong["size"] and one_wrong["shape_positions"] and one_wrong["background_positions"]
    junk = tiny.score_grid(grid, "no idea")
    assert not any(v for key, v in junk.items() if key != "cells") and junk["cells"] == 0.0


def test_grid_rows_name_no_task_and_no_plan():
    for seed in range(20):
        row, _, _ = tiny.grid_row(seed, "train")
        text = json.dumps(row["messages"]).lower()
        for word in ("frozenlake", "maze", "minibehaviour", "player", "goal", "plan", "<answer>", "hole", "printer"):
            assert word not in text


def test_grid_split_loads_and_is_scored_by_envs(tmp_path):
    out = tiny.write_grids(tmp_path / "grids", "val", 6)
    rows = envs.load_split(out)
    assert [r["kind"] for r in rows] == ["vision"] * 6 and all(Path(r["image"]).is_file() for r in rows)
    assert all(envs.score_row(r, r["answer"])["all_correct"] for r in rows)
    import evaluate

    summary = evaluate.main(["--model", "oracle", "--backend", "oracle", "--data", str(out), "--kind", "vision",
                             "--out", str(tmp_path / "eval")])
    assert summary["conditions"]["image"]["per_task"]["grid"]["cells"] == 1.0
    assert summary["conditions"]["image"]["per_task"]["grid"]["all_correct"] == 1.0
    proc = subprocess.run([sys.executable, str(ROOT / "tiny.py"), "grids", "--out", str(out), "--split", "val",
                           "--count", "2"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "exists" in proc.stderr

