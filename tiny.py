"""Generic visual pre-training data for tiny models: random grids of coloured cells and shapes.

A real instruct VLM arrives with a vision tower that already says what is where. Our tiny
stand-in is built from random weights, so before it can play that part it must learn to see.
It learns on pictures that are *not* the tasks: a K x K grid (K = 3..5) of 32-pixel cells at the
top-left of the canvas (the same layout as `envs.py data --cell-size 32`), each cell a random
background colour, a third of them holding a random shape (circle, square, triangle, cross,
ring) in another random colour. Every picture gets one numbered question set:

    1. What is the grid size?                  -> 4x4
    2. Write the shape map ...                 -> one line per row, one letter per cell (. = empty)
    3. Where are the <colour> shapes?          -> (r, c) list, row-major, or none
    4. Which cells have a <colour> background? -> (r, c) list, row-major, or none

The answer formats are those of the tasks' perception answers, but no task object, task
picture, or plan is ever shown, so the base model that trains on these rows (and on text
planning) has never planned from an image nor answered a task's perception question.

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

COLOURS = {"red": (220, 30, 30), "orange": (240, 140, 20), "yellow": (250, 210, 0), "green": (40, 170, 60),
           "cyan": (60, 200, 220), "blue": (30, 90, 230), "navy": (20, 30, 70), "purple": (130, 60, 190),
           "pink": (240, 120, 180), "white": (255, 255, 255), "black": (0, 0, 0), "tan": (210, 180, 140),
           "brown": (120, 70, 30)}
SHAPES = {"C": "circle", "S": "square", "T": "triangle", "X": "cross", "O": "ring"}
PAD = (128, 128, 128)  # the canvas outside the grid
SIZES = (3, 4, 5)
SEED_BASE = {"train": 0, "val": 10**8, "test": 2 * 10**8}  # disjoint seed ranges, as in envs.SPLITS


def make_grid(seed, sizes=SIZES):
    """A random grid: {"size": K, "background": [[colour]], "shapes": {(r, c): (letter, colour)}}."""
    rng = random.Random(f"grid/{seed}")
    k = rng.choice(sizes)
    names = sorted(COLOURS)
    main = rng.choice(names)
    background = [[main if rng.random() < 0.6 else rng.choice(names) for _ in range(k)] for _ in range(k)]
    shapes = {}
    for r in range(k):
        for c in range(k):
            if rng.random() < 0.35:
                shapes[(r, c)] = (rng.choice(sorted(SHAPES)), rng.choice([n for n in names if n != background[r][c]]))
    present = sorted({colour for _, colour in shapes.values()})
    odd = sorted({b for row in background for b in row} - {main})
    ask_shape = rng.choice(present) if present and rng.random() < 0.8 else rng.choice(names)
    ask_background = rng.choice(odd) if odd and rng.random() < 0.8 else rng.choice(names)
    return {"size": k, "background": background, "shapes": shapes, "seed": seed,
            "ask_shape": ask_shape, "ask_background": ask_background}


def draw_grid(grid, canvas=160, cell=32):
    """The picture: cell (r, c) spans [c*cell, (c+1)*cell) x [r*cell, (r+1)*cell); grey outside."""
    rng = random.Random(f"draw/{grid['seed']}")
    img = Image.new("RGB", (canvas, canvas), PAD)
    d = ImageDraw.Draw(img)
    for r, row in enumerate(grid["background"]):
        for c, name in enumerate(row):
            x, y = c * cell, r * cell
            d.rectangle([x, y, x + cell - 1, y + cell - 1], fill=COLOURS[name], outline=(90, 90, 90))
            if (r, c) not in grid["shapes"]:
                continue
            letter, colour = grid["shapes"][(r, c)]
            half = cell * rng.uniform(0.25, 0.38)
            cx, cy = x + cell / 2 + rng.uniform(-2, 2), y + cell / 2 + rng.uniform(-2, 2)
            box = [cx - half, cy - half, cx + half, cy + half]
            ink = COLOURS[colour]
            if letter == "C":
                d.ellipse(box, fill=ink)
            elif letter == "S":
                d.rectangle(box, fill=ink)
            elif letter == "T":
                d.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=ink)
            elif letter == "X":
                w = max(2, half / 2.5)
                d.line([box[0], box[1], box[2], box[3]], fill=ink, width=round(w))
                d.line([box[0], box[3], box[2], box[1]], fill=ink, width=round(w))
            else:
                d.ellipse(box, outline=ink, width=max(2, round(half / 3)))
    return img


def grid_prompt(grid):
    legend = ", ".join(f"{letter} {name}" for letter, name in SHAPES.items())
    return (f"The image shows a grid of coloured cells; some cells hold a shape ({legend}). Coordinates are "
            f"(row, col), 0-based, (0,0) at the top-left. Answer each question on its own numbered line: sizes like "
            f"4x4, positions like (r, c), lists comma-separated in row-major order (none when empty).\n"
            f"1. What is the grid size?\n"
            f"2. Write the shape map: one line per row, one letter per cell, . for an empty cell.\n"
            f"3. Where are the {grid['ask_shape']} shapes?\n"
            f"4. Which cells have a {grid['ask_background']} background?")


def _facts(grid):
    k = grid["size"]
    return {"map": ["".join(grid["shapes"].get((r, c), (".",))[0] for c in range(k)) for r in range(k)],
            "shape_cells": sorted(p for p, (_, colour) in grid["shapes"].items() if colour == grid["ask_shape"]),
            "background_cells": [(r, c) for r in range(k) for c in range(k)
                                 if grid["background"][r][c] == grid["ask_background"]]}


def grid_answer(grid):
    f = _facts(grid)
    return "\n".join([f"1. {grid['size']}x{grid['size']}", "2.", *f["map"], f"3. {envs.fmt_list(f['shape_cells'], True)}",
                      f"4. {envs.fmt_list(f['background_cells'], True)}"])


def score_grid(grid, response):
    """size, shapes_cells (share of cells whose letter is right), shape / background positions, all_correct."""
    f, sections = _facts(grid), envs._numbered(response)
    k = grid["size"]
    lines = [re.sub(r"\s", "", line) for line in (sections.get(2) or "").strip().splitlines()]
    right = sum(c < len(lines[r]) and lines[r][c] == f["map"][r][c] for r in range(min(k, len(lines))) for c in range(k))
    result = {"size": envs._answer_matches(k, sections.get(1)),
              "shape_map": len(lines) == k and all(line == want for line, want in zip(lines, f["map"])),
              "shape_positions": envs._answer_matches(f["shape_cells"], sections.get(3)),
              "background_positions": envs._answer_matches(f["background_cells"], sections.get(4))}
    result["all_correct"] = all(result.values())
    result["cells"] = right / (k * k)
    return result


def grid_row(seed, split, canvas=160, cell=32):
    """(data row, relative image path, picture) of one grid: kind "vision", task "grid"."""
    grid = make_grid(seed, tuple(s for s in SIZES if s * cell <= canvas))
    image = f"images/grid-{seed:09d}.png"
    state = {"task": "grid", "level": grid["size"], "background": grid["background"],
             "shapes": [[r, c, letter, colour] for (r, c), (letter, colour) in sorted(grid["shapes"].items())],
             "ask_shape": grid["ask_shape"], "ask_background": grid["ask_background"], "seed": seed}
    answer = grid_answer(grid)
    base = {"id": f"grid-{seed:09d}", "task": "grid", "level": grid["size"], "seed": seed, "split": split,
            "state": state, "plan": []}
    row = envs._message_row(base, "vision", envs._user(envs._text(grid_prompt(grid)), {"type": "image", "image": image}),
                            answer, image=image)
    return row, image, draw_grid(grid, canvas, cell)


def state_to_grid(state):
    """The grid of a row's state (rows store shapes as [r, c, letter, colour] lists)."""
    return {"size": state["level"], "background": state["background"], "seed": state["seed"],
            "shapes": {(r, c): (letter, colour) for r, c, letter, colour in state["shapes"]},
            "ask_shape": state["ask_shape"], "ask_background": state["ask_background"]}


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
