"""What the model did, as a picture (evaluate.py's gallery.png, pipeline.py's stage 1 vs MGSD sheet): each planning
episode is the task picture with the model's parsed plan drawn over it as a path, cell to cell, stopping where the
one simulator (envs.trajectory) stops, the shortest plan as a thin green line beside it, and a mark. The path and
the mark come from the simulator that scores the episode, so the picture cannot disagree with the score."""
import random

from PIL import Image, ImageDraw

import envs
from mgsd import pictures

TILE, CAPTION, LABEL = 168, 58, 118  # picture side, caption height, width of a row's label (pixels)
WIDTH = 27  # characters of a caption line that fit under a tile
MARKS = {  # mark -> (colour, words)
    "optimal": ((20, 150, 60), "success, shortest"),
    "success": ((110, 190, 60), "success, longer"),
    "illegal": ((210, 40, 40), "illegal move"),
    "fell": ((210, 40, 40), "fell into a hole"),
    "short": ((230, 140, 20), "stopped short"),
    "unparsed": ((120, 120, 120), "no plan parsed"),
}
PATH, SHORTEST = (255, 120, 0), (40, 170, 80)


def outcome(state, plan):
    """(cells visited [(r, c)], where the plan was picked up and dropped, the mark) of a parsed plan (None: none)."""
    if plan is None:
        return [tuple(envs.World(state).start[:2])], [], "unparsed"
    sims, status = envs.trajectory(state, plan)
    mark = {"success": "optimal" if len(plan) == len(state["plan"]) else "success", "illegal": "illegal",
            "fell": "fell", "ok": "short"}[status]
    actions = [(a, sims[i][:2]) for i, a in enumerate(plan[:len(sims) - 1]) if a in ("PICK", "DROP")]
    return [s[:2] for s in sims], actions, mark


def _arrow(draw, a, b, colour, width):
    draw.line([a, b], fill=colour, width=width)
    (x0, y0), (x1, y1) = a, b
    length = max(1e-6, ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5)
    ux, uy, head = (x1 - x0) / length, (y1 - y0) / length, 3 * width
    draw.polygon([(x1, y1), (x1 - head * ux - head * uy / 2, y1 - head * uy + head * ux / 2),
                  (x1 - head * ux + head * uy / 2, y1 - head * uy - head * ux / 2)], fill=colour)


def tile(state, plan, caption):
    """One episode: the picture with the path (orange arrows, the last one to where the simulator stopped), the
    shortest plan (thin green), the mark at the last cell and as a frame, and `caption` below."""
    n = state["level"]
    cell, margin = pictures.geometry(n, TILE)
    img = Image.new("RGB", (TILE, TILE + CAPTION), (255, 255, 255))
    img.paste(pictures.render(state, TILE), (0, 0))
    draw = ImageDraw.Draw(img)

    def centre(rc, shift=0.0):
        return margin + (rc[1] + 0.5 + shift) * cell, margin + (rc[0] + 0.5 + shift) * cell

    shortest, _, _ = outcome(state, state["plan"])
    draw.line([centre(c, -0.1) for c in shortest], fill=SHORTEST, width=2)
    cells, actions, mark = outcome(state, plan)
    colour, words = MARKS[mark]
    width = max(2, cell // 9)
    for a, b in zip(cells, cells[1:]):
        if a != b:
            _arrow(draw, centre(a, 0.1), centre(b, 0.1), PATH, width)
    for action, rc in actions:  # MiniBehaviour: where the printer was picked up and dropped
        x, y = centre(rc, 0.1)
        draw.text((x - 3, y - 6), action[0], fill=(0, 0, 0))
    x, y = centre(cells[-1], 0.1)
    r = cell * 0.28
    if mark in ("illegal", "fell"):
        draw.line([(x - r, y - r), (x + r, y + r)], fill=colour, width=width + 1)
        draw.line([(x - r, y + r), (x + r, y - r)], fill=colour, width=width + 1)
    elif mark != "unparsed":
        draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=width)
    draw.rectangle([0, 0, TILE - 1, TILE - 1], outline=colour, width=4)
    draw.text((4, TILE + 2), words, fill=colour)
    for i, line in enumerate(caption.splitlines()[:3]):
        draw.text((4, TILE + 15 + 14 * i), line if len(line) <= WIDTH else line[:WIDTH - 1] + "…", fill=(0, 0, 0))
    return img, cells[-1], mark


def choose(pairs, per_group, seed=0):
    """Up to per_group (row, record) pairs of one group, failures first, each part in a seeded shuffle."""
    rng = random.Random(seed)
    failed = [p for p in pairs if not p[1]["metrics"].get("success")]
    passed = [p for p in pairs if p[1]["metrics"].get("success")]
    rng.shuffle(failed)
    rng.shuffle(passed)
    return (failed + passed)[:per_group]


def groups(rows, records, per_group=4, seed=0, keys=None):
    """{(task, condition): [(row, record)]} of planning records: the chosen sample of each, or, with keys
    {(task, condition): [id, ...]}, those instances (another model's sample, for a side-by-side sheet)."""
    by_id = {r["id"]: r for r in rows}
    found = {}
    for record in records:
        if record.get("kind") == "planning" and record["id"] in by_id:
            found.setdefault((record["task"], record["condition"]), []).append((by_id[record["id"]], record))
    if keys is not None:
        return {g: [p for i in ids for p in found.get(g, []) if p[1]["id"] == i] for g, ids in keys.items()}
    return {g: choose(found[g], per_group, seed) for g in sorted(found)}


def sheet(chosen, title=""):
    """One picture: a row per (task, condition), a tile per episode. -> (image, [(id, condition, last cell,
    mark)] of every tile, in order)."""
    columns = max((len(p) for p in chosen.values()), default=1)
    head = 18 if title else 0
    img = Image.new("RGB", (LABEL + columns * (TILE + 6), head + len(chosen) * (TILE + CAPTION + 6)), (255, 255, 255))
    draw, drawn = ImageDraw.Draw(img), []
    if title:
        draw.text((6, 3), title, fill=(0, 0, 0))
    for i, ((task, condition), pairs) in enumerate(chosen.items()):
        y = head + i * (TILE + CAPTION + 6)
        draw.text((6, y + TILE // 2 - 12), f"{envs.NAMES[task]}\nfrom the {condition}", fill=(0, 0, 0))
        for j, (row, record) in enumerate(pairs):
            plan = record.get("plan")
            caption = (f"level {row['level']}, {len(plan) if plan else 0} actions\n"
                       f"plan {envs.plan_text(plan, task) if plan else '-'}\n"
                       f"best {envs.plan_text(row['state']['plan'], task)}")
            picture, last, mark = tile(row["state"], plan, caption)
            img.paste(picture, (LABEL + j * (TILE + 6), y))
            drawn.append((record["id"], condition, last, mark))
    return img, drawn


def compare(rows, before, after, path, per_group=3):
    """pipeline.py's gallery.png: stage 1's episodes `before` (left) and MGSD's `after` (right) on the same instances,
    MGSD's failures first. Returns what each side's tiles show: [(id, condition, last cell, mark)] x 2."""
    right = groups(rows, after, per_group)
    left = groups(rows, before, keys={g: [r["id"] for _, r in pairs] for g, pairs in right.items()})
    (left_image, left_drawn), (right_image, right_drawn) = sheet(left, "stage 1: perception SFT"), \
        sheet(right, "MGSD: stage 1 + OPCD")
    img = Image.new("RGB", (left_image.width + 12 + right_image.width, max(left_image.height, right_image.height)),
                    (255, 255, 255))
    img.paste(left_image, (0, 0))
    img.paste(right_image, (left_image.width + 12, 0))
    img.save(path)
    return left_drawn, right_drawn
