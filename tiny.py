"""Generic visual pre-training data for tiny models: objects on a grid, one question a picture.

A real instruct VLM arrives with a vision tower that already says what is where. Our tiny
stand-in is built from random weights, so before it can play that part it must learn to see.
It learns on pictures that are *not* the tasks: a K x K grid (K = 3..5) of 32-pixel white cells
at the top-left of the canvas (the layout of `envs.py data --cell-size 32`: one cell, one merged
vision token), about a third of the cells holding one of five objects of fixed appearance:

    C red circle   S blue square   T green triangle   X orange cross   O purple ring

Each picture gets one question (which one follows from its seed):

    map    Write the map ...              -> one line per row, one letter per cell (. = empty)
    where  Where are the <objects>?       -> (r, c) list, row-major, or none
    what   What is at (r, c)?             -> the object's name, or nothing

The answer formats are those of the tasks' text maps and perception answers, but no task object,
task picture, or plan is ever shown, so a base model that trains on these rows (and on text
planning) has never planned from an image nor answered a task's perception question.
Single-answer questions and fixed appearances are what a tiny model learns from random weights
in hundreds of steps; random colours and four questions at once were not learned in 600
(results/mini/REPORT.md).

    python tiny.py grids --out data/grids/train --split train --count 20000
    python tiny.py grids --out data/grids/val --split val --count 200
"""
import random
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw

import cli
import envs

OBJECTS = {"C": ("red circle", (220, 30, 30)), "S": ("blue square", (30, 90, 230)),
           "T": ("green triangle", (40, 170, 60)), "X": ("orange cross", (240, 140, 20)),
           "O": ("purple ring", (130, 60, 190))}
QUESTIONS = ("map", "where", "what")
PAD, FLOOR, LINE = (128, 128, 128), (255, 255, 255), (90, 90, 90)
SIZES = (3, 4, 5)
SEED_BASE = {"train": 0, "val": 10**8, "test": 2 * 10**8}  # disjoint seed ranges, as in envs.SPLITS


def make_grid(seed, sizes=SIZES):
    """A random grid: {"size": K, "objects": {(r, c): letter}, "question": [type, argument], "seed"}."""
    rng = random.Random(f"grid/{seed}")
    k = rng.choice(sizes)
    cells = [(r, c) for r in range(k) for c in range(k)]
    placed = [p for p in cells if rng.random() < 0.3] or [rng.choice(cells)]
    objects = {p: rng.choice(sorted(OBJECTS)) for p in placed}
    kind = QUESTIONS[seed % len(QUESTIONS)]
    if kind == "where":  # mostly an object that is there; sometimes one that is not
        argument = rng.choice(sorted(set(objects.values()))) if rng.random() < 0.8 else rng.choice(sorted(OBJECTS))
    elif kind == "what":  # an occupied cell half of the time
        argument = list(rng.choice(placed) if rng.random() < 0.5 else rng.choice(cells))
    else:
        argument = None
    return {"size": k, "objects": objects, "question": [kind, argument], "seed": seed}


def draw_grid(grid, canvas=160, cell=32):
    """The picture: cell (r, c) spans [c*cell, (c+1)*cell) x [r*cell, (r+1)*cell); grey outside."""
    img = Image.new("RGB", (canvas, canvas), PAD)
    d = ImageDraw.Draw(img)
    k, half = grid["size"], cell * 0.32
    for r in range(k):
        for c in range(k):
            d.rectangle([c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1], fill=FLOOR, outline=LINE)
    for (r, c), letter in grid["objects"].items():
        cx, cy = (c + 0.5) * cell, (r + 0.5) * cell
        box, ink = [cx - half, cy - half, cx + half, cy + half], OBJECTS[letter][1]
        if letter == "C":
            d.ellipse(box, fill=ink)
        elif letter == "S":
            d.rectangle(box, fill=ink)
        elif letter == "T":
            d.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=ink)
        elif letter == "X":
            d.line(box, fill=ink, width=round(cell / 8))
            d.line([box[0], box[3], box[2], box[1]], fill=ink, width=round(cell / 8))
        else:
            d.ellipse(box, outline=ink, width=round(cell / 8))
    return img


def grid_prompt(grid):
    kind, argument = grid["question"]
    legend = ", ".join(f"{letter} {name}" for letter, (name, _) in OBJECTS.items())
    if kind == "map":
        question = f"Write the map: one line per row, one letter per cell ({legend}, . empty)."
    elif kind == "where":
        question = f"Where are the {OBJECTS[argument][0]}s? List them as (r, c) in row-major order, or none."
    else:
        question = f"What is at ({argument[0]}, {argument[1]})? Name the object, or nothing."
    return (f"The image shows a grid of white cells; some cells hold an object. Coordinates are (row, col), "
            f"0-based, (0,0) at the top-left.\n{question}")


def grid_answer(grid):
    kind, argument = grid["question"]
    k, objects = grid["size"], grid["objects"]
    if kind == "map":
        return "\n".join("".join(objects.get((r, c), ".") for c in range(k)) for r in range(k))
    if kind == "where":
        return envs.fmt_list(sorted(p for p, letter in objects.items() if letter == argument), True)
    letter = objects.get(tuple(argument))
    return OBJECTS[letter][0] if letter else "nothing"


def score_grid(grid, response):
    """{"all_correct": the answer is right, <question type>: the same, and for the map question "cells": the
    share of cells read right}. Positions are compared as sets, names and map letters case-blind."""
    kind, argument = grid["question"]
    want = grid_answer(grid)
    if kind == "where":
        right = envs._answer_matches(sorted(p for p, letter in grid["objects"].items() if letter == argument), response)
        return {"all_correct": right, kind: right}
    if kind == "what":
        right = " ".join(response.split()).lower() == want
        return {"all_correct": right, kind: right}
    got = [re.sub(r"\s", "", line).upper() for line in response.strip().splitlines()]
    rows = want.splitlines()
    cells = sum(r < len(got) and c < len(got[r]) and got[r][c] == letter
                for r, row in enumerate(rows) for c, letter in enumerate(row)) / sum(map(len, rows))
    return {"all_correct": got == rows, kind: got == rows, "cells": cells}


def grid_row(seed, split, canvas=160, cell=32):
    """(data row, relative image path, picture) of one grid: kind "vision", task "grid"."""
    grid = make_grid(seed, tuple(s for s in SIZES if s * cell <= canvas))
    image = f"images/grid-{seed:09d}.png"
    state = {"task": "grid", "level": grid["size"], "seed": seed, "question": grid["question"],
             "objects": [[r, c, letter] for (r, c), letter in sorted(grid["objects"].items())]}
    base = {"id": f"grid-{seed:09d}", "task": "grid", "level": grid["size"], "seed": seed, "split": split,
            "state": state, "plan": []}
    row = envs._message_row(base, "vision", envs._user(envs._text(grid_prompt(grid)), {"type": "image", "image": image}),
                            grid_answer(grid), image=image)
    return row, image, draw_grid(grid, canvas, cell)


def state_to_grid(state):
    """The grid of a row's state (rows store objects as [r, c, letter] lists)."""
    return {"size": state["level"], "seed": state["seed"], "question": state["question"],
            "objects": {(r, c): letter for r, c, letter in state["objects"]}}


def write_grids(out_dir, split, count, canvas=160, cell=32):
    """out_dir/data.jsonl + images/, written to a temporary sibling and renamed."""
    if count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    if canvas < 3 * cell:
        raise ValueError(f"--canvas {canvas} cannot hold a 3x3 grid of {cell}-pixel cells")
    out = Path(out_dir).absolute()
    if out.exists():
        raise ValueError(f"{out} exists; remove it first")
    with cli.atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "data.jsonl", "w") as f:
            for seed in range(SEED_BASE[split], SEED_BASE[split] + count):
                row, image, picture = grid_row(seed, split, canvas, cell)
                picture.save(tmp / image)
                f.write(envs._disk_row(row) + "\n")
    return out


def main(argv=None):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
    g = sub.add_parser("grids", help="write a split of generic grid-reading rows (kind vision)")
    g.add_argument("--out", required=True, help="output directory (must not exist)")
    g.add_argument("--split", required=True, choices=tuple(SEED_BASE), help="seed range: train / val / test")
    g.add_argument("--count", type=int, required=True, help="number of pictures (one row each)")
    g.add_argument("--canvas", type=int, default=160, help="picture side in pixels (the tiny model's image size)")
    g.add_argument("--cell-size", type=int, default=32, help="cell side in pixels (one merged vision token)")
    args = parser.parse_args(argv)
    try:
        out = write_grids(args.out, args.split, args.count, args.canvas, args.cell_size)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out / 'data.jsonl'}")


if __name__ == "__main__":
    main()
