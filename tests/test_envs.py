"""envs.py and mgsd/splits.py against method.md §1-§6: parser, optimal plans, rules, prompts, pictures, data on disk, CLI.

The references here are written independently of envs.py: an exhaustive search over action
sequences, the rules of method.md §1 restated, and a pixel decoder that reads cell-centre colours."""
import hashlib
import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

import envs
from mgsd import dynamics, pictures, splits

ROOT = Path(__file__).resolve().parents[1]
SMALL_LEVELS = {"frozenlake": (3, 4), "maze": (3, 4), "minibehaviour": (4, 5)}


def instances(task, level, count, first_seed=0):
    found = [envs.generate(task, level, s) for s in range(first_seed, first_seed + 5 * count)]
    return [s for s in found if s is not None][:count]


# ---------------------------------------------------------------- parser (method.md §4)
@pytest.mark.parametrize("text, task, plan", [
    ("<answer>UUR</answer>", "maze", ["U", "U", "R"]),
    ("<answer>U,DDDRRR</answer>", "frozenlake", ["U", "D", "D", "D", "R", "R", "R"]),
    ("<answer>**DDRR**.</answer>", "maze", ["D", "D", "R", "R"]),
    ("<answer>pick up</answer>", "minibehaviour", ["PICK"]),
    ("<answer>put down</answer>", "minibehaviour", ["DROP"]),
    ("<answer>U</answer> then <answer>LL</answer>", "maze", ["L", "L"]),
    ("<ANSWER>l, d</ANSWER>", "frozenlake", ["L", "D"]),
    ("<answer>go north</answer>", "frozenlake", None),
])
def test_parser_table_of_spec(text, task, plan):
    assert envs.parse_plan(text, task) == plan


@pytest.mark.parametrize("text, task, plan", [
    ("no block at all: DDRR", "frozenlake", None),
    ("<answer></answer>", "frozenlake", None),
    ("<answer>UR</answer> and an unclosed <answer>DD", "maze", ["U", "R"]),
    ("<answer>UR</answer><answer>fly</answer>", "maze", None),  # the last block wins, even when invalid
    ("<answer>up, up, Right; down -> left</answer>", "maze", ["U", "U", "R", "D", "L"]),
    ("<answer>↑ ↑→, ↓</answer>", "frozenlake", ["U", "U", "R", "D"]),
    ("<answer>`R->R->D`</answer>", "frozenlake", ["R", "R", "D"]),
    ("<answer>D,D,PICK,R,DROP</answer>", "minibehaviour", ["D", "D", "PICK", "R", "DROP"]),
    ("<answer>pick_up, pickup, Pick Up, putdown, drop</answer>", "minibehaviour", ["PICK"] * 3 + ["DROP"] * 2),
    ("<answer>D,PICK</answer>", "frozenlake", None),  # PICK outside MiniBehaviour
    ("<answer>drop</answer>", "maze", None),
    ("<answer>3R</answer>", "maze", None),
    ("<answer>DDRR, stop</answer>", "maze", None),
    ("<answer>\n  RRD.\n</answer>", "maze", ["R", "R", "D"]),
])
def test_parser_hard_cases(text, task, plan):
    assert envs.parse_plan(text, task) == plan


def test_parser_takes_the_same_last_block_as_a_lazy_regex():
    """The block finder is a single pass; a regex `<answer>(.*?)</answer>` (quadratic on many unclosed
    tags) is the reference for which block is last."""
    import random
    import re

    rng = random.Random(0)
    pieces = ["<answer>", "</answer>", "<ANSWER>", "</Answer>", "R", "D", " ", "x", ","]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(12)))
        blocks = re.findall(r"<answer>(.*?)</answer>", text, re.IGNORECASE | re.DOTALL)
        expected = envs.parse_plan(f"<answer>{blocks[-1]}</answer>", "maze") if blocks else None
        assert envs.parse_plan(text, "maze") == expected, text


def test_parser_stays_fast_on_thousands_of_unclosed_tags():
    """8,000 unclosed tags took 13 s with the lazy regex; a response of megabytes would hang an evaluation."""
    text = "<answer>RD</answer>" + "<answer>" * 400_000 + "R"
    assert envs.parse_plan(text, "maze") == ["R", "D"]


# ---------------------------------------------------------------- the rules, restated (method.md §1)
def reference_step(state, pos, carrying, action):
    """method.md §1 rules written out again: -> (pos, carrying, status)."""
    n, (r, c) = state["level"], pos
    delta = {"L": (0, -1), "D": (1, 0), "R": (0, 1), "U": (-1, 0)}
    inside = lambda p: 0 <= p[0] < n and 0 <= p[1] < n
    if state["task"] == "minibehaviour":
        table, printer = {tuple(p) for p in state["table"]}, tuple(state["printer"])
        near = lambda cells: any(abs(r - a) + abs(c - b) == 1 for a, b in cells)
        if action == "PICK":
            return (pos, True, "ok") if not carrying and near([printer]) else (pos, carrying, "illegal")
        if action == "DROP":
            return (pos, carrying, "success") if carrying and near(table) else (pos, carrying, "illegal")
        p = (r + delta[action][0], c + delta[action][1])
        if not inside(p) or p in table or (p == printer and not carrying):
            return pos, carrying, "illegal"
        return p, carrying, "ok"
    if action not in delta:
        return pos, carrying, "illegal"
    p = (r + delta[action][0], c + delta[action][1])
    if not inside(p):
        return pos, carrying, "illegal"
    if state["task"] == "maze":
        if {"U": "U", "D": "D", "L": "L", "R": "R"}[action] not in state["open"][r][c]:
            return pos, carrying, "illegal"
        return p, carrying, ("success" if p == tuple(state["target"]) else "ok")
    if p in {tuple(h) for h in state["holes"]}:
        return p, carrying, "fell"
    return p, carrying, ("success" if p == tuple(state["goal"]) else "ok")


def start_of(state):
    return tuple(state["agent"] if state["task"] == "minibehaviour" else state["start"])


def reference_outcome(state, actions):
    pos, carrying = start_of(state), False
    for a in actions:
        pos, carrying, status = reference_step(state, pos, carrying, a)
        if status != "ok":
            return status
    return "ok"


def exhaustive_shortest(state, limit):
    """Length of the shortest successful action sequence of length <= limit (enumerating every
    sequence, pruning only those that already ended), or None."""
    actions = envs.ACTIONS[state["task"]]
    frontier = [()]
    for length in range(1, limit + 1):
        nxt = []
        for prefix in frontier:
            for a in actions:
                outcome = reference_outcome(state, prefix + (a,))
                if outcome == "success":
                    return length
                if outcome == "ok":
                    nxt.append(prefix + (a,))
        frontier = nxt
    return None


@pytest.mark.parametrize("task", envs.TASKS)
def test_bfs_plans_are_optimal_against_exhaustive_search(task):
    for level in SMALL_LEVELS[task]:
        for state in instances(task, level, 12):
            plan = state["plan"]
            assert reference_outcome(state, plan) == "success"
            assert exhaustive_shortest(state, len(plan)) == len(plan), (state, plan)


@pytest.mark.parametrize("task", envs.TASKS)
def test_every_illegal_action_fails(task):
    rng = random.Random(0)
    checked = 0
    for level in envs.DEFAULT_LEVELS[task]:
        for state in instances(task, level, 8):
            walk = []  # a random legal walk; from every point on it, try every action
            for _ in range(12):
                pos, carrying = start_of(state), False
                for a in walk:
                    pos, carrying, _ = reference_step(state, pos, carrying, a)
                for a in envs.ACTIONS[task] + (("PICK", "DROP") if task != "minibehaviour" else ()):
                    expected = reference_step(state, pos, carrying, a)[2]
                    result = envs.simulate(state, walk + [a])
                    assert result["illegal"] == (expected == "illegal"), (state, walk, a)
                    assert result["success"] == (expected == "success")
                    assert result["fell"] == (expected == "fell")
                    if expected in ("illegal", "fell"):
                        assert not envs.simulate(state, walk + [a] + state["plan"])["success"]  # no recovery
                        checked += 1
                ok = [a for a in envs.ACTIONS[task] if reference_step(state, pos, carrying, a)[2] == "ok"]
                if not ok:
                    break
                walk.append(rng.choice(ok))
    assert checked > 50


def test_off_grid_move_is_illegal_and_actions_after_success_are_ignored():
    state = {"task": "frozenlake", "level": 3, "start": [0, 0], "goal": [0, 1], "holes": [], "plan": ["R"]}
    assert envs.simulate(state, ["U"]) == {"success": False, "illegal": True, "fell": False, "steps": 1}
    assert envs.simulate(state, ["R", "U", "U"]) == {"success": True, "illegal": False, "fell": False, "steps": 1}
    score = envs.score_planning(state, "<answer>RUU</answer>")
    assert score["success"] and not score["optimal"]  # extra actions: success, not optimal
    assert envs.score_planning(state, "<answer>R</answer>")["optimal"]
    assert envs.score_planning(state, None) == {"parse_ok": False, "success": False, "optimal": False,
                                               "illegal": False, "plan": None}


# ---------------------------------------------------------------- generation (method.md §1)
def test_generation_is_a_pure_function_of_task_level_seed():
    for task in envs.TASKS:
        for level in envs.DEFAULT_LEVELS[task]:
            for seed in range(5):
                assert envs.generate(task, level, seed) == envs.generate(task, level, seed)
    random.seed(1)
    a = envs.generate("maze", 5, 3)
    random.seed(2)
    assert envs.generate("maze", 5, 3) == a  # the global RNG plays no part


def test_mazes_are_perfect_with_walled_borders():
    for level in envs.DEFAULT_LEVELS["maze"]:
        for state in instances("maze", level, 10):
            n, open_ = level, state["open"]
            edges = set()
            for r, c in itertools.product(range(n), range(n)):
                for a in open_[r][c]:
                    dr, dc = {"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}[a]
                    assert 0 <= r + dr < n and 0 <= c + dc < n  # the border is walled
                    assert {"U": "D", "D": "U", "L": "R", "R": "L"}[a] in open_[r + dr][c + dc]  # walls are shared
                    edges.add(frozenset({(r, c), (r + dr, c + dc)}))
            assert len(edges) == n * n - 1  # a spanning tree: connected with exactly one path between cells
            length = len(state["plan"])
            lo, hi = {"easy": (1, max(1, n // 2)), "medium": (max(1, n // 2) + 1, n), "hard": (n + 1, n * n)}[state["difficulty"]]
            assert lo <= length <= hi


def test_maze_split_balances_difficulty_buckets():
    found = splits.collect("maze", 4, "val", 30)
    counts = {d: sum(s["difficulty"] == d for _, s in found) for d in ("easy", "medium", "hard")}
    assert counts == {"easy": 10, "medium": 10, "hard": 10}


# ---------------------------------------------------------------- prompts (method.md §3)
def valid_state(state):
    n = state["level"]
    inside = lambda p: 0 <= p[0] < n and 0 <= p[1] < n
    if state["task"] == "frozenlake":
        cells = [state["start"], state["goal"], *state["holes"]]
        return all(map(inside, cells)) and len({tuple(p) for p in cells}) == len(cells)
    if state["task"] == "maze":
        edges = {frozenset({(r, c), (r + dr, c + dc)}) for r in range(n) for c in range(n) for a in state["open"][r][c]
                 for dr, dc in [{"U": (-1, 0), "D": (1, 0), "L": (0, -1), "R": (0, 1)}[a]]}
        return (len(edges) == n * n - 1 and inside(state["start"]) and inside(state["target"])
                and state["start"] != state["target"])
    table = sorted(map(tuple, state["table"]))
    r0, c0 = table[0]
    block = [(r0 + i, c0 + j) for i in range(2) for j in range(3)]
    others = [tuple(state["printer"]), tuple(state["agent"])]
    return table == block and all(map(inside, block + others)) and len(set(block + others)) == 8


@pytest.mark.parametrize("task", envs.TASKS)
def test_prompt_worked_example_is_valid_and_its_answer_optimal(task):
    example = envs.EXAMPLES[task]
    assert valid_state(example)
    response = envs.reference_response(example)
    state = envs.generate(task, envs.DEFAULT_LEVELS[task][0], 1)
    prompts = [envs.student_messages(state, "x.png")[0]["content"][0]["text"],
               envs.text_student_messages(state)[0]["content"][0]["text"],
               envs.teacher_messages(state)[0]["content"][0]["text"]]
    for prompt in prompts:
        assert response in prompt
    plan = envs.parse_plan(response, task)
    assert reference_outcome(example, plan) == "success"
    assert exhaustive_shortest(example, len(plan)) == len(plan)


@pytest.mark.parametrize("task", envs.TASKS)
def test_prompt_shapes(task):
    state = envs.generate(task, envs.DEFAULT_LEVELS[task][-1], 4)
    student = envs.student_messages(state, "img.png")
    assert [m["role"] for m in student] == ["user"] and student[0]["content"][-1] == {"type": "image", "image": "img.png"}
    teacher = envs.teacher_messages(state)
    assert [m["role"] for m in teacher] == ["system", "user"]
    assert "image" in teacher[0]["content"][0]["text"] and "reference plan" not in teacher[0]["content"][0]["text"]
    context = teacher[1]["content"][0]["text"]
    lines = context.split("\n")
    assert lines[1].endswith("do not say that a reference plan was given.")  # in the user turn, with the plan line
    assert lines[-2:] == ["Reference action plan: " + envs.plan_text(state["plan"], task),
                          "Solve the task and end with exactly one <answer>...</answer> block."]
    assert "Reasoning focus:" in lines and envs.text_state(state) in context
    without = envs.teacher_messages(state, with_plan=False)[1]["content"][0]["text"]
    assert "reference plan" not in without.lower()  # the plan line and the clause go together
    assert without.split("\n")[-1] == lines[-1] and len(without.split("\n")) == len(lines) - 1
    text_prompt = envs.text_student_messages(state)[0]["content"][0]["text"]
    assert envs.text_state(state) in text_prompt and "Reference action plan" not in text_prompt
    assert envs.score_planning(state, envs.reference_response(state))["optimal"]
    response = envs.reference_response(state)
    assert response.count("<answer>") == 1 and len(response.split("\n")) == 3  # recap, one sentence, answer


def test_frozenlake_teacher_context_matches_spec_example():
    state = {"task": "frozenlake", "level": 4, "start": [0, 1], "goal": [3, 3], "holes": [[1, 1], [2, 3]]}
    state["plan"] = envs.solve(state)
    lines = envs.teacher_context(state).split("\n")
    assert lines[3:13] == ["Task: FrozenLake", "Map size: 4x4", "Start: (0,1)", "Goal: (3,3)", "Holes: (1,1), (2,3)",
                           "Text map:", "FSFF", "FHFF", "FFFH", "FFFG"]
    assert "Reference action plan: " + "".join(state["plan"]) in lines
    assert any("H" in line and "hole" in line for line in lines[13:])  # the reasoning focus names the symbols


def test_maze_teacher_context_has_a_wall_table_that_matches_the_open_directions():
    state = envs.generate("maze", 4, 2)
    lines = envs.teacher_context(state).split("\n")
    table = lines[lines.index("Walls by cell (sides U R D L, 1 = wall, 0 = open):") + 1:][:4]
    for r, row in enumerate(table):
        for c, mask in enumerate(row.split()):
            assert {a for a, bit in zip("URDL", mask) if bit == "0"} == set(state["open"][r][c])


# ---------------------------------------------------------------- pictures (method.md §1, §10)
def decode(img, task, n, cell=None):
    """Recover the symbolic state from pixels: the colour at each cell centre names its content
    (LEGEND); maze walls are black pixels just inside a cell edge, at the middle of that edge.
    cell: the grid sits at the top-left in cells of this many pixels (envs.py data --cell-size)."""
    img = img.convert("RGB")
    size = img.size[0]
    cell, margin = (cell, 0) if cell else (size // n, (size - n * (size // n)) // 2)
    by_colour = {rgb: role for role, _, rgb in pictures.LEGEND[task]}
    px = img.load()
    roles, open_ = {}, [["" for _ in range(n)] for _ in range(n)]
    for r, c in itertools.product(range(n), range(n)):
        x0, y0 = margin + c * cell, margin + r * cell
        roles[(r, c)] = by_colour[px[x0 + cell // 2, y0 + cell // 2]]
        if task == "maze":
            probes = {"U": (x0 + cell // 2, y0 + 1), "R": (x0 + cell - 2, y0 + cell // 2),
                      "D": (x0 + cell // 2, y0 + cell - 2), "L": (x0 + 1, y0 + cell // 2)}
            open_[r][c] = "".join(a for a, xy in probes.items() if px[xy] != (0, 0, 0))
    cells = lambda role: sorted([list(p) for p, v in roles.items() if v == role])
    if task == "frozenlake":
        return {"start": cells("player")[0], "goal": cells("goal")[0], "holes": cells("hole")}
    if task == "maze":
        return {"start": cells("player")[0], "target": cells("target")[0], "open": open_}
    return {"agent": cells("agent")[0], "printer": cells("printer")[0], "table": cells("table")}


@pytest.mark.parametrize("size", [256, 128])
@pytest.mark.parametrize("task", envs.TASKS)
def test_picture_encodes_the_state(task, size):
    for level in envs.DEFAULT_LEVELS[task]:
        for state in instances(task, level, 6, first_seed=100):
            img = pictures.render(state, size)
            assert img.mode == "RGB" and img.size == (size, size)
            decoded = decode(img, task, level)
            expected = {k: (sorted(v) if k in ("holes", "table") else v) for k, v in state.items() if k in decoded}
            assert decoded == expected, (task, level, size)


@pytest.mark.parametrize("task", envs.TASKS)
def test_with_a_cell_size_each_cell_is_one_aligned_block_at_the_top_left(task):
    """Tiny models: 32-pixel cells on a 160-pixel canvas, so cell (r, c) is merged vision token (r, c)
    at every level, and everything right of and below the grid is the border colour."""
    for level in (3, 4, 5):
        if not envs.LEVEL_RANGE[task][0] <= level:
            continue
        for state in instances(task, level, 4, first_seed=7):
            img = pictures.render(state, 160, cell=32)
            assert img.size == (160, 160)
            decoded = decode(img, task, level, cell=32)
            assert decoded == {k: (sorted(v) if k in ("holes", "table") else v) for k, v in state.items() if k in decoded}
            outside = {img.getpixel((x, y)) for x in range(0, 160, 7) for y in range(0, 160, 7) if max(x, y) >= 32 * level}
            assert outside <= {pictures.BORDER[task]}, (task, level)


def test_a_cell_size_that_does_not_fit_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cell size 32 does not fit level 6 into 160 px"):
        splits.make_split(tmp_path / "d", "train", 1, tasks=["maze"], levels=[6], image_size=160, cell_size=32)
    assert not (tmp_path / "d").exists()


def test_frozenlake_start_and_goal_are_at_least_two_moves_apart():
    """The reference generator's rule: no one-move maps (they were 34 % of level 3)."""
    plans = [envs.generate("frozenlake", level, seed) for level in (3, 4) for seed in range(400)]
    assert all(len(s["plan"]) >= 2 for s in plans if s is not None)
    assert sum(s is not None for s in plans) > 400


def gymnasium_frozenlake_picture(state):
    """gymnasium's own FrozenLake rgb_array rendering of `state` (64-px cells): the reference for the sprites."""
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    import gymnasium

    n = state["level"]
    desc = [["F"] * n for _ in range(n)]
    for r, c in state["holes"]:
        desc[r][c] = "H"
    desc[state["goal"][0]][state["goal"][1]], desc[state["start"][0]][state["start"][1]] = "G", "S"
    env = gymnasium.make("FrozenLake-v1", desc=["".join(row) for row in desc], is_slippery=False, render_mode="rgb_array")
    env.reset(seed=0)
    picture = env.render()
    env.close()
    return picture


def test_sprite_style_draws_frozenlake_as_gymnasium_does_and_data_can_use_it(tmp_path):
    """--frozenlake-style sprites: the VSP benchmark's pictures are gymnasium's rendering; ours from the same
    sprite files agree pixel for pixel but for a few alpha-blended edge pixels (measured 0.02-0.03 %)."""
    import numpy as np

    for level, seed in ((3, 5), (4, 1), (6, 2)):
        state = envs.generate("frozenlake", level, seed)
        ours = np.asarray(pictures.render(state, 64 * level, style="sprites"))
        theirs = gymnasium_frozenlake_picture(state)
        assert ours.shape == theirs.shape
        assert (ours == theirs).all(-1).mean() > 0.999
        assert (ours != np.asarray(pictures.render(state, 64 * level))).any(-1).mean() > 0.5  # not the plain style
    result = run_cli("data", "--out", str(tmp_path / "d"), "--split", "test", "--per-level", "2", "--tasks", "frozenlake",
                     "maze", "--levels", "3", "--frozenlake-style", "sprites", "--image-size", "192")
    assert result.returncode == 0, result.stderr
    for row in splits.load_split(tmp_path / "d"):
        picture = np.asarray(Image.open(row["image"]).convert("RGB"))
        assert np.array_equal(picture, np.asarray(pictures.render(row["state"], 192, style=(
            "sprites" if row["task"] == "frozenlake" else "plain"))))
        if row["task"] == "frozenlake":
            assert (picture == gymnasium_frozenlake_picture(row["state"])).all(-1).mean() > 0.999


def test_grid_lines_are_visible_between_cells():
    for task in ("frozenlake", "minibehaviour"):
        state = envs.generate(task, 8 if task == "frozenlake" else 6, 0)
        img = pictures.render(state, 128)
        cell, margin = pictures.geometry(state["level"], 128)
        column = [img.getpixel((margin + cell, y)) for y in range(margin, margin + cell * state["level"])]
        floor = pictures.COLOR[task]["frozen" if task == "frozenlake" else "floor"]
        assert floor not in column  # a line runs down the boundary between column 0 and column 1


def test_prompt_legend_is_the_renderer_legend():
    for task in envs.TASKS:
        legend = envs.picture_legend(task)
        state = envs.generate(task, envs.DEFAULT_LEVELS[task][0], 3)
        img = pictures.render(state, 256)
        cell, m, n = *pictures.geometry(state["level"], 256), state["level"]
        colours_at_centres = {img.getpixel((m + c * cell + cell // 2, m + r * cell + cell // 2))
                              for r in range(n) for c in range(n)}
        for role, description, rgb in pictures.LEGEND[task]:
            assert description in legend
            assert description in envs.student_messages(state, "x")[0]["content"][0]["text"]
        assert colours_at_centres <= {rgb for _, _, rgb in pictures.LEGEND[task]}
    assert "the red triangle is the agent" in envs.picture_legend("minibehaviour")


# method.md §1's colour words, and what each means in RGB.
DOC_COLOURS = {("frozenlake", "frozen"): "ice-blue", ("frozenlake", "hole"): "dark", ("maze", "corridor"): "white",
                ("maze", "player"): "yellow", ("maze", "target"): "blue", ("minibehaviour", "floor"): "white",
                ("minibehaviour", "table"): "tan", ("minibehaviour", "printer"): "blue", ("minibehaviour", "agent"): "red"}
COLOUR_WORDS = {"ice-blue": lambda r, g, b: b > 220 and g > 180 and r < b, "dark": lambda r, g, b: max(r, g, b) < 90,
                "white": lambda r, g, b: min(r, g, b) > 230,
                "yellow": lambda r, g, b: r > 200 and g > 180 and b < 80, "blue": lambda r, g, b: b > 180 and r < 100,
                "tan": lambda r, g, b: r > g > b > 100, "red": lambda r, g, b: r > 180 and g < 80 and b < 80}


def test_legend_colours_are_the_spec_colours_at_rendered_cell_centres():
    for (task, role), word in DOC_COLOURS.items():
        state = envs.generate(task, envs.DEFAULT_LEVELS[task][-1], 11)
        img = pictures.render(state, 128)
        cell, margin = pictures.geometry(state["level"], 128)
        centres = [img.getpixel((margin + c * cell + cell // 2, margin + r * cell + cell // 2))
                   for (r, c), v in pictures.cell_roles(state).items() if v == role]
        description = {name: text for name, text, _ in pictures.LEGEND[task]}[role]
        assert centres and all(COLOUR_WORDS[word](*rgb) for rgb in centres), (task, role)
        assert word in description and description in envs.picture_legend(task)


# ---------------------------------------------------------------- QA and scoring (method.md §4, §5)
@pytest.mark.parametrize("task", envs.TASKS)
def test_perception_answer_scores_correct_and_errors_are_caught(task):
    state = instances(task, envs.DEFAULT_LEVELS[task][-1], 1, first_seed=7)[0]
    answer = envs.perception_answer(state)
    scores = envs.score_perception(state, answer)
    assert scores["all_correct"] and all(scores.values())
    lines = answer.split("\n")
    for i, line in enumerate(lines):  # lists of positions are graded as sets: reversing one changes nothing
        if line.count("(") >= 2 and ":" not in line:
            reversed_line = line[:3] + ", ".join(reversed(line[3:].split(", (")[:1] + ["(" + x for x in line[3:].split(", (")[1:]]))
            assert reversed_line != line
            assert envs.score_perception(state, "\n".join(lines[:i] + [reversed_line] + lines[i + 1:]))["all_correct"]
    wrong_size = answer.replace(f"1. {state['level']}x{state['level']}", "1. 9x9")
    result = envs.score_perception(state, wrong_size)
    assert not result["size"] and not result["all_correct"] and sum(result.values()) == len(result) - 2
    assert not any(envs.score_perception(state, None).values())


def test_perception_scorer_on_frozenlake_by_hand():
    state = {"task": "frozenlake", "level": 4, "start": [0, 1], "goal": [3, 3], "holes": [[2, 3], [1, 1]], "plan": ["D"]}
    assert envs.perception_answer(state) == "1. 4x4\n2. (0, 1)\n3. (3, 3)\n4. (1, 1), (2, 3)"
    got = envs.score_perception(state, "1. 4 x 4\n2. (0,1)\n3) (3, 3)\n4. (2, 3) and (1, 1)")
    assert got == {"size": True, "player": True, "goal": True, "holes": True, "all_correct": True}
    got = envs.score_perception(state, "1. 4x4\n2. (0, 1)\n3. (3, 3)\n4. (1, 1)")
    assert got["holes"] is False and got["all_correct"] is False
    empty = {**state, "holes": []}
    assert envs.score_perception(empty, "1. 4x4\n2. (0, 1)\n3. (3, 3)\n4. none")["all_correct"]


@pytest.mark.parametrize("task", envs.TASKS)
def test_dynamics_labels_come_from_the_simulator(task):
    for level in envs.DEFAULT_LEVELS[task]:
        for seed, state in enumerate(instances(task, level, 5)):
            for sub, question, answer, query in dynamics.questions(state, seed):
                row = {"kind": "dynamics", "subkind": sub, "state": state, "answer": answer, "query": query}
                assert splits.score_row(row, answer) == {"correct": True}
                if sub == "forward":
                    outcome = reference_outcome(state, query["actions"])
                    word = {"ok": "ok", "illegal": "illegal", "fell": "fell into hole",
                            "success": "dropped" if task == "minibehaviour" else "goal reached"}[outcome]
                    assert answer.endswith(word)
                    assert not splits.score_row(row, answer.replace(word, "illegal" if word != "illegal" else "ok"))["correct"]
                elif sub == "verify":
                    expected = reference_outcome(state, query["candidate"]) == "success"
                    assert answer == ("yes" if expected else "no")
                    assert not splits.score_row(row, "no" if expected else "yes")["correct"]
                else:
                    walk = envs.parse_plan(answer, task)
                    assert len(walk) == query["length"] == walking_distance(state, query["after"]) >= 1
                    assert not splits.score_row(row, f"<answer>{envs.plan_text(walk + walk[-1:], task)}</answer>")["correct"]


def walking_distance(state, target):
    """Fewest moves (each with status ok) from the start to `target`, by breadth over reference_step."""
    frontier, seen, steps = {start_of(state)}, {start_of(state)}, 0
    while tuple(target) not in frontier:
        frontier = {reference_step(state, p, False, a)[0] for p in frontier for a in "URDL"
                    if reference_step(state, p, False, a)[2] == "ok"} - seen
        seen |= frontier
        steps += 1
        assert frontier, "target unreachable"
    return steps


def test_aggregate_macro_is_the_unweighted_mean_over_tasks():
    eps = ([{"task": "frozenlake", "level": 3, "success": s, "optimal": s, "error": False} for s in (True, False)]
           + [{"task": "maze", "level": 3, "success": True, "optimal": False, "error": False}]
           + [{"task": "minibehaviour", "level": 5, "success": False, "optimal": False, "error": True}] * 3
           + [{"task": "minibehaviour", "level": 6, "success": True, "optimal": True, "error": False}])
    agg = envs.aggregate(eps)
    assert agg["per_task"]["frozenlake"]["success"] == 0.5
    assert agg["per_task"]["minibehaviour"]["success"] == 0.25
    assert agg["per_task"]["minibehaviour"]["n"] == 4 and agg["per_task"]["minibehaviour"]["errors"] == 3
    assert agg["per_level"]["minibehaviour"][5] == {"success": 0.0, "optimal": 0.0, "n": 3, "errors": 3}
    assert agg["macro"]["success"] == pytest.approx((0.5 + 1.0 + 0.25) / 3)
    assert agg["macro"]["optimal"] == pytest.approx((0.5 + 0.0 + 0.25) / 3)


# ---------------------------------------------------------------- data on disk (method.md §6)
ALL_KINDS = ("planning", "text-planning", "teacher", "perception", "dynamics")


def tree_bytes(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_same_seeds_give_byte_identical_files(tmp_path):
    a = splits.make_split(tmp_path / "a", "train", 4, kinds=ALL_KINDS, image_size=128)
    b = splits.make_split(tmp_path / "b", "train", 4, kinds=ALL_KINDS, image_size=128, workers=2)
    files_a, files_b = tree_bytes(a), tree_bytes(b)
    assert len(files_a) > 50 and files_a == files_b
    rows = [json.loads(line) for line in files_a["data.jsonl"].decode().splitlines()]
    per_level = {}
    for row in rows:
        per_level.setdefault((row["task"], row["level"], row["kind"]), set()).add(row["seed"])
    assert {k: len(v) for k, v in per_level.items()} == {(t, lv, k): 4 for t in envs.TASKS for lv in envs.DEFAULT_LEVELS[t]
                                                         for k in ALL_KINDS}


def canonical(state):
    return json.dumps({k: v for k, v in state.items() if k != "plan"}, sort_keys=True)


def test_splits_are_disjoint():
    for task, level, count in [("frozenlake", 3, 300), ("maze", 3, 150), ("minibehaviour", 5, 150)]:
        by_split = {split: splits.collect(task, level, split, count if split == "train" else count // 3)
                  for split in ("train", "val", "test")}
        seeds = [{seed for seed, _ in found} for found in by_split.values()]
        states = [{canonical(s) for _, s in found} for found in by_split.values()]
        for (i, a), (j, b) in itertools.combinations(enumerate(seeds), 2):
            assert not a & b and not states[i] & states[j]
        for split, found in by_split.items():
            assert len({canonical(s) for _, s in found}) == len(found)  # no repeats inside a split


def test_disjoint_split_dirs(make_data):
    ids = {}
    for split in ("train", "val", "test"):
        rows = splits.load_split(make_data(split, 3))
        ids[split] = {hashlib.md5(canonical(r["state"]).encode()).hexdigest() for r in rows}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]


def test_too_many_instances_is_a_clear_error_within_seconds():
    start = time.time()
    with pytest.raises(ValueError, match=r"^frozenlake level 3: only \d+ distinct instances found for split train "
                                         r"after \d+ seeds; ask for fewer$"):
        splits.collect("frozenlake", 3, "train", 20000)
    with pytest.raises(ValueError, match="only"):
        splits.collect("frozenlake", 2, "val", 100)
    assert time.time() - start < 10


def test_frozenlake_3_has_enough_train_instances():
    assert len(splits.collect("frozenlake", 3, "train", 1000)) == 1000


def test_load_split_resolves_images_and_rejects_broken_dirs(make_data, tmp_path):
    data = Path(make_data("val", 2, kinds=ALL_KINDS))
    rows = splits.load_split(data)
    assert {r["kind"] for r in rows} == set(ALL_KINDS)
    for row in rows:
        images = [i["image"] for m in row["messages"] for i in m["content"] if i["type"] == "image"]
        assert all(os.path.isabs(p) and os.path.isfile(p) for p in images + ([row["image"]] if row["image"] else []))
        if row["kind"] == "perception":  # the PNG on disk encodes the state, at the tiny-model size
            picture = Image.open(row["image"])
            assert picture.size == (128, 128)
            decoded = decode(picture, row["task"], row["level"])
            assert decoded == {k: (sorted(v) if k in ("holes", "table") else v) for k, v in row["state"].items()
                               if k in decoded}
        score = splits.score_row(row, row["answer"])
        assert score[{"planning": "optimal", "text-planning": "optimal", "teacher": "optimal", "perception": "all_correct",
                      "dynamics": "correct"}[row["kind"]]]
    assert {r["kind"] for r in splits.load_split(data, kinds=["perception"])} == {"perception"}
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        splits.load_split(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no data.jsonl"):
        splits.load_split(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    lines = (data / "data.jsonl").read_text().splitlines()
    (broken / "data.jsonl").write_text(lines[0] + "\n")
    with pytest.raises(FileNotFoundError, match="image not found"):
        splits.load_split(broken)
    (broken / "data.jsonl").write_text(lines[0][:50] + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl:1: malformed JSON"):
        splits.load_split(broken)
    (broken / "data.jsonl").write_text('{"id": "x"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:1: row misses task, level, kind, state, plan, messages$"):
        splits.load_split(broken)


def test_datasets_reads_data_jsonl(make_data):
    datasets = pytest.importorskip("datasets")
    data = Path(make_data("val", 2, kinds=ALL_KINDS))
    rows = splits.load_split(data)
    # Small chunks make `datasets` infer the schema from the first rows only (FrozenLake planning),
    # as it does on a full-size file: every later row must still fit it.
    ds = datasets.load_dataset("json", data_files=str(data / "data.jsonl"), split="train", chunksize=4096)
    assert len(ds) == len(rows) and {r["task"] for r in rows} == set(envs.TASKS)
    for got, want in zip(ds, rows):
        assert got["id"] == want["id"] and got["answer"] == want["answer"] and json.loads(got["state"]) == want["state"]
        assert [i.get("image") for m in got["messages"] for i in m["content"] if i["type"] == "image"] == [
            os.path.relpath(i["image"], data) for m in want["messages"] for i in m["content"] if i["type"] == "image"]


# ---------------------------------------------------------------- command line
def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "envs.py"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


@pytest.mark.parametrize("args", [
    ["data", "--split", "train", "--per-level", "2", "--tasks", "chess"],
    ["data", "--split", "train", "--per-level", "2", "--tasks", "maze", "--levels", "40"],
    ["data", "--split", "train", "--per-level", "2", "--kinds", "planning,poetry"],
    ["data", "--split", "train", "--per-level", "0"],
    ["data", "--split", "holdout", "--per-level", "2"],
    ["data", "--split", "train", "--per-level", "2", "--image-size", "10"],
    ["data", "--split", "train", "--per-level", "two"],
    ["data", "--split", "train", "--per-level", "2", "--levels", "maze=3,x"],
    ["data", "--split", "train", "--per-level", "2", "--levels", "minibehaviour=3"],
])
def test_bad_command_line_input_is_one_line_exit_2_nothing_written(tmp_path, args):
    out = tmp_path / "out"
    result = run_cli(*args, "--out", str(out))
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error:")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_path_is_one_line_exit_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("data", "--out", str(blocker / "sub"), "--split", "val", "--per-level", "1", "--tasks", "maze")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    result = run_cli("show", "chess", "--level", "3", "--seed", "0")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_cli_data_and_show_write_what_they_say(tmp_path):
    result = run_cli("data", "--out", str(tmp_path / "d"), "--split", "test", "--per-level", "2", "--tasks", "maze",
                     "--levels", "3", "4", "--image-size", "128", "--workers", "2")
    assert result.returncode == 0, result.stderr
    rows = splits.load_split(tmp_path / "d")
    assert len(rows) == 8 and {r["level"] for r in rows} == {3, 4} and {r["split"] for r in rows} == {"test"}
    assert Image.open(rows[0]["image"]).size == (128, 128)
    result = run_cli("show", "minibehaviour", "--level", "5", "--seed", "3", "--out", str(tmp_path / "mb.png"))
    assert result.returncode == 0, result.stderr
    state = envs.generate("minibehaviour", 5, 3)
    for text in (envs.teacher_context(state), envs.reference_response(state), envs.perception_answer(state)):
        assert text in result.stdout
    assert decode(Image.open(tmp_path / "mb.png"), "minibehaviour", 5)["agent"] == state["agent"]


def test_cli_levels_can_be_given_per_task(tmp_path):
    result = run_cli("data", "--out", str(tmp_path / "d"), "--split", "val", "--per-level", "1",
                     "--levels", "frozenlake=3", "maze=3,4", "minibehaviour=4", "--image-size", "128")
    assert result.returncode == 0, result.stderr
    rows = splits.load_split(tmp_path / "d")
    assert sorted({(r["task"], r["level"]) for r in rows}) == [
        ("frozenlake", 3), ("maze", 3), ("maze", 4), ("minibehaviour", 4)]


def test_written_pictures_read_back_as_the_rendered_picture(tmp_path):
    import numpy as np

    out = splits.make_split(tmp_path / "d", "val", 2, levels={"frozenlake": [3], "maze": [5], "minibehaviour": [6]},
                          kinds=["planning", "dynamics"], image_size=129)  # an odd width
    rows = splits.load_split(out)
    for row in rows:
        picture = Image.open(row["image"])
        assert picture.format == "PNG" and picture.size == (129, 129)
        assert np.array_equal(np.asarray(picture.convert("RGB")), np.asarray(pictures.render(row["state"], 129)))

def test_answer_only_rows_hold_the_plan_alone(tmp_path):
    """planning-direct (the paper's direct-SFT baseline): the answer-only instructions and the same picture as the
    planning row; the target is the optimal plan in one answer block, nothing else."""
    out = splits.make_split(tmp_path / "d", "train", 2, kinds=("planning", "planning-direct"), image_size=128,
                            levels={"frozenlake": [3], "maze": [3], "minibehaviour": [5]})
    rows = splits.load_split(out)
    direct = [r for r in rows if r["kind"] == "planning-direct"]
    assert len(direct) == 6 and len(rows) == 12
    for row in direct:
        plan = envs.plan_text(row["plan"], row["task"])
        assert row["answer"] == f"<answer>{plan}</answer>" and row["answer"].count("\n") == 0
        assert splits.score_row(row, row["answer"])["optimal"]
        prompt = row["messages"][0]["content"][0]["text"]
        assert "Do not restate the map" in prompt and "first briefly restate" not in prompt
        example = envs.EXAMPLES[row["task"]]  # the worked example is answer-only too
        assert f"Example answer for another map:\n<answer>{envs.plan_text(example['plan'], row['task'])}</answer>" in prompt
        twin = next(r for r in rows if r["kind"] == "planning" and r["seed"] == row["seed"] and r["task"] == row["task"])
        assert twin["image"] == row["image"] and row["messages"][0]["content"][1] == {"type": "image", "image": row["image"]}
        assert twin["answer"].endswith(row["answer"]) and twin["answer"] != row["answer"]
