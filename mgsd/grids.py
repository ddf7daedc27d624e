"""Generic grid pictures, the row kind "vision" that teaches a tiny base to see (docs/method.md §5.3): a K x K grid
(K = 3..5) of 32-px cells at the top-left of the canvas, about a third of them holding one of five objects, and one
question a picture (the map; where are the <objects>; what is at (r, c)). No task object, picture or plan.
A kind of its own, like dynamics.py: its grids, pictures, questions, answers and scorer; mgsd/tiny.py writes
its split folders.
"""
import random
import re

from PIL import Image, ImageDraw

import envs

OBJECTS = {"C": ("red circle", (220, 30, 30)), "S": ("blue square", (30, 90, 230)),
           "T": ("green triangle", (40, 170, 60)), "X": ("orange cross", (240, 140, 20)),
           "O": ("purple ring", (130, 60, 190))}
QUESTIONS = ("map", "where", "what")
PAD, FLOOR, LINE = (128, 128, 128), (255, 255, 255), (90, 90, 90)
GRID_SIZES = (3, 4, 5)


def make_grid(seed, sizes=GRID_SIZES):
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


def state_to_grid(state):
    """The grid of a row's state (rows store objects as [r, c, letter] lists)."""
    return {"size": state["level"], "seed": state["seed"], "question": state["question"],
            "objects": {(r, c): letter for r, c, letter in state["objects"]}}


def score(row, response):
    """The scores of a response to a vision row (splits.score_row)."""
    return score_grid(state_to_grid(row["state"]), response)
