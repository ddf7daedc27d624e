"""The three grid-world planning tasks of MGSD: generation, pictures, text views, prompts, the one
parser / simulator / scorer, question-answer data, and the data-set writer (docs/method.md §1-§6).

  frozenlake     walk from S to G; a hole ends the episode, a move off the grid is illegal.
  maze           a perfect maze carved by randomised DFS; moving through a wall is illegal.
  minibehaviour  walk next to the printer, PICK it, walk next to the 2x3 table, DROP it.
Every instance is a pure function of (task, level, seed) and carries its shortest plan, found by
breadth-first search over the simulator's own `step`, so the planner, the simulator and the scorer
can never disagree. One parser (`parse_plan`) and one simulator (`simulate`) serve the training
reward, validation and every evaluation. Pictures are PIL tiles (no assets); a cell's centre shows
one flat colour per cell type (pictures.py's `LEGEND`, the table the prompts describe).

Data rows (one JSON line each, pictures as relative paths, see `instance_rows`):
  planning       student prompt (image) -> reference_response   (direct visual SFT, the oracle)
  text-planning  text-student prompt    -> reference_response   (text-planning pre-training)
  teacher        teacher prompt         -> reference_response   (teaches a tiny base the teacher's prompt)
  perception     numbered questions (image) -> numbered answer  (stage-1 SFT)
  dynamics       forward / inverse (two images) / verify QA with exact labels (dynamics.py)
Commands: README.md, "Data".
"""
import hashlib
import json
import multiprocessing
import os
import random
import re
from collections import deque
from functools import lru_cache
from pathlib import Path

import cli
from pictures import LEGEND, STYLES, render, sprite_folder

TASKS = ("frozenlake", "maze", "minibehaviour")
DEFAULT_LEVELS = {"frozenlake": (3, 4, 5, 6, 7, 8), "maze": (3, 4, 5, 6), "minibehaviour": (5, 6)}
LEVEL_RANGE = {"frozenlake": (2, 10), "maze": (2, 10), "minibehaviour": (4, 10)}
NAMES = {"frozenlake": "FrozenLake", "maze": "Maze", "minibehaviour": "MiniBehaviour"}
KINDS = ("planning", "text-planning", "teacher", "perception", "dynamics")
MOVES = {"U": (-1, 0), "R": (0, 1), "D": (1, 0), "L": (0, -1)}  # BFS tries actions in this order
WORDS = {"U": "up", "R": "right", "D": "down", "L": "left"}
ACTIONS = {"frozenlake": ("U", "R", "D", "L"), "maze": ("U", "R", "D", "L"), "minibehaviour": ("U", "R", "D", "L", "PICK", "DROP")}
SPLITS = {"train": (0, 0.0, 0.8), "val": (10**8, 0.8, 0.9), "test": (2 * 10**8, 0.9, 1.0)}  # seed base, hash range
HOLE_PROB = 0.1



def fmt(p, space=False):
    return f"({p[0]}, {p[1]})" if space else f"({p[0]},{p[1]})"


def fmt_list(cells, space=False):
    return ", ".join(fmt(p, space) for p in sorted(map(tuple, cells))) or "none"


def plan_text(plan, task):
    return ",".join(plan) if task == "minibehaviour" else "".join(plan)


# ---------------------------------------------------------------- simulator: one step function per task
class World:
    """Precomputed lookups of one state; `step(sim, action) -> (sim', status)`,
    status in ok / illegal / fell / success. sim = (r, c) or (r, c, carrying)."""

    def __init__(self, state):
        self.task, self.n = state["task"], state["level"]
        if self.task == "minibehaviour":
            self.start = (*state["agent"], False)
            self.printer = tuple(state["printer"])
            self.table = {tuple(p) for p in state["table"]}
        else:
            self.start = tuple(state["start"])
            self.goal = tuple(state["goal"] if self.task == "frozenlake" else state["target"])
            self.holes = {tuple(p) for p in state.get("holes", ())}
            self.open = state.get("open")

    def step(self, sim, a):
        n, r, c = self.n, sim[0], sim[1]
        if self.task == "minibehaviour":
            carrying = sim[2]
            if a == "PICK":
                ok = not carrying and abs(r - self.printer[0]) + abs(c - self.printer[1]) == 1
                return ((r, c, True), "ok") if ok else (sim, "illegal")
            if a == "DROP":
                ok = carrying and any(abs(r - tr) + abs(c - tc) == 1 for tr, tc in self.table)
                return (sim, "success") if ok else (sim, "illegal")
            dr, dc = MOVES[a]
            p = (r + dr, c + dc)
            if not (0 <= p[0] < n and 0 <= p[1] < n) or p in self.table or (p == self.printer and not carrying):
                return sim, "illegal"
            return (*p, carrying), "ok"
        if a not in MOVES:
            return sim, "illegal"
        dr, dc = MOVES[a]
        p = (r + dr, c + dc)
        if self.task == "maze" and a not in self.open[r][c]:
            return sim, "illegal"
        if not (0 <= p[0] < n and 0 <= p[1] < n):
            return sim, "illegal"
        if p in self.holes:
            return p, "fell"
        return p, ("success" if p == self.goal else "ok")


def solve(state, done=lambda sim, status: status == "success", actions=None):
    """Breadth-first search over World.step: a shortest list of actions whose last step is `done`, every
    earlier one "ok" (default: a shortest plan), or None."""
    world = World(state)
    parent = {world.start: None}
    queue = deque([world.start])
    while queue:
        sim = queue.popleft()
        for a in actions or ACTIONS[state["task"]]:
            nxt, status = world.step(sim, a)
            if done(nxt, status):
                plan, back = [a], sim
                while parent[back] is not None:
                    back, act = parent[back]
                    plan.append(act)
                return plan[::-1]
            if status == "ok" and nxt not in parent:
                parent[nxt] = (sim, a)
                queue.append(nxt)
    return None


def rollout(state, actions):
    """(final sim, status, steps) of `actions` from the initial state, stopping at the first success or
    failure (method.md §4); an illegal action leaves the position where it was."""
    world = World(state)
    sim, status, steps = world.start, "ok", 0
    for a in actions:
        nxt, status = world.step(sim, a)
        steps += 1
        sim = nxt if status != "illegal" else sim
        if status != "ok":
            break
    return sim, status, steps


def simulate(state, actions):
    _, status, steps = rollout(state, actions)
    return {"success": status == "success", "illegal": status == "illegal", "fell": status == "fell", "steps": steps}


# ---------------------------------------------------------------- generation
def _rng(task, level, seed):
    return random.Random(f"{task}/{level}/{seed}")  # str seeds hash with sha512: stable everywhere


def _cells(n):
    return [(r, c) for r in range(n) for c in range(n)]


def _maze_buckets(n):
    easy, medium = max(1, n // 2), n
    return {"easy": (1, easy), "medium": (easy + 1, medium), "hard": (medium + 1, n * n)}


def _gen_frozenlake(n, rng, seed):
    start, goal = rng.sample(_cells(n), 2)
    if abs(start[0] - goal[0]) + abs(start[1] - goal[1]) < 2:  # the reference's rule: a shortest path of >= 2 moves
        return None
    holes = [list(p) for p in _cells(n) if p not in (start, goal) and rng.random() < HOLE_PROB]
    return {"start": list(start), "goal": list(goal), "holes": holes}


@lru_cache(maxsize=None)
def _neighbours(n):
    return {(r, c): [(a, (r + dr, c + dc)) for a, (dr, dc) in MOVES.items() if 0 <= r + dr < n and 0 <= c + dc < n]
            for r, c in _cells(n)}


def _gen_maze(n, rng, seed):
    open_ = [[set() for _ in range(n)] for _ in range(n)]
    first, neighbours = (rng.randrange(n), rng.randrange(n)), _neighbours(n)
    seen, stack = {first}, [first]
    while stack:  # randomised depth-first carving: a perfect maze
        r, c = stack[-1]
        nbrs = [(a, p) for a, p in neighbours[(r, c)] if p not in seen]
        if not nbrs:
            stack.pop()
            continue
        a, p = rng.choice(nbrs)
        open_[r][c].add(a)
        open_[p[0]][p[1]].add({"U": "D", "D": "U", "L": "R", "R": "L"}[a])
        seen.add(p)
        stack.append(p)
    open_ = [["".join(a for a in "URDL" if a in cell) for cell in row] for row in open_]
    difficulty = ("easy", "medium", "hard")[seed % 3]
    lo, hi = _maze_buckets(n)[difficulty]
    start = (rng.randrange(n), rng.randrange(n))
    dist, queue = {start: 0}, deque([start])
    while queue:
        r, c = queue.popleft()
        for a in open_[r][c]:
            p = (r + MOVES[a][0], c + MOVES[a][1])
            if p not in dist:
                dist[p] = dist[(r, c)] + 1
                queue.append(p)
    targets = [p for p in _cells(n) if lo <= dist[p] <= hi]
    if not targets:
        return None
    return {"start": list(start), "target": list(rng.choice(targets)), "open": open_, "difficulty": difficulty}


def _gen_minibehaviour(n, rng, seed):
    tr, tc = rng.randrange(n - 1), rng.randrange(n - 2)
    table = [(tr + i, tc + j) for i in range(2) for j in range(3)]
    printer, agent = rng.sample([p for p in _cells(n) if p not in table], 2)
    return {"agent": list(agent), "printer": list(printer), "table": [list(p) for p in table]}


GENERATORS = {"frozenlake": _gen_frozenlake, "maze": _gen_maze, "minibehaviour": _gen_minibehaviour}


def draft(task, level, seed):
    """The state of a seed without its plan (cheap: no search), or None when the seed is skipped."""
    body = GENERATORS[task](level, _rng(task, level, seed), seed)
    return None if body is None else {"task": task, "level": level, **body}


def generate(task, level, seed):
    """The instance of (task, level, seed) with its BFS plan, or None when the seed is skipped."""
    state = draft(task, level, seed)
    if state is not None:
        state["plan"] = solve(state)
    return state if state and state["plan"] else None


# ---------------------------------------------------------------- text views (method.md §2)
def _adjacent(n, cells, blocked):
    out = {(r + dr, c + dc) for r, c in cells for dr, dc in MOVES.values()}
    return sorted(p for p in out if 0 <= p[0] < n and 0 <= p[1] < n and p not in blocked)


def legal_moves(state):
    """Words of the actions that are not illegal from the initial state (a hole is legal, fatal)."""
    world = World(state)
    return [WORDS.get(a, a.lower()) for a in ACTIONS[state["task"]] if world.step(world.start, a)[1] != "illegal"]


def facts(state):
    """Typed facts of a state, in the order of the perception questions (method.md §5.1)."""
    task, n = state["task"], state["level"]
    pos = lambda key: tuple(state[key])
    if task == "frozenlake":
        return {"size": n, "player": pos("start"), "goal": pos("goal"), "holes": sorted(map(tuple, state["holes"]))}
    if task == "maze":
        open_ = {(r, c): [WORDS[a] for a in state["open"][r][c]] for r, c in _cells(n)}
        return {"size": n, "player": pos("start"), "target": pos("target"), "open": open_, "legal_moves": legal_moves(state)}
    table = [tuple(p) for p in state["table"]]
    return {"size": n, "agent": pos("agent"), "printer": pos("printer"), "table": sorted(table),
            "printer_adjacent": _adjacent(n, [pos("printer")], table), "table_adjacent": _adjacent(n, table, table),
            "legal_moves": legal_moves(state)}


def _open_lines(open_, space=False):
    return [f"{fmt(p, space)}: {', '.join(words) or 'none'}" for p, words in open_.items()]


def text_state(state):
    """The symbolic state as plain text, one fact per line, without the reference plan (method.md §2.2)."""
    task, n, f = state["task"], state["level"], facts(state)
    lines = [f"Task: {NAMES[task]}", f"Map size: {n}x{n}"]
    if task == "frozenlake":
        grid = [["F"] * n for _ in range(n)]
        for r, c in f["holes"]:
            grid[r][c] = "H"
        (sr, sc), (gr, gc) = f["player"], f["goal"]
        grid[sr][sc], grid[gr][gc] = "S", "G"
        lines += [f"Start: {fmt(f['player'])}", f"Goal: {fmt(f['goal'])}", f"Holes: {fmt_list(f['holes'])}",
                  "Text map:"] + ["".join(row) for row in grid]
    elif task == "maze":
        lines += [f"Start: {fmt(f['player'])}", f"Target: {fmt(f['target'])}", "Open directions by cell:"]
        lines += _open_lines(f["open"])
    else:
        grid = [["."] * n for _ in range(n)]
        for r, c in f["table"]:
            grid[r][c] = "T"
        (pr, pc), (ar, ac) = f["printer"], f["agent"]
        grid[pr][pc], grid[ar][ac] = "P", "A"
        lines += [f"Agent: {fmt(f['agent'])}", f"Printer: {fmt(f['printer'])}", f"Table cells: {fmt_list(f['table'])}",
                  f"Printer-adjacent cells: {fmt_list(f['printer_adjacent'])}",
                  f"Table-adjacent cells: {fmt_list(f['table_adjacent'])}",
                  f"Legal first moves: {', '.join(f['legal_moves']) or 'none'}",
                  "Text grid (A=agent, P=printer, T=table, .=free):"] + ["".join(row) for row in grid]
    return "\n".join(lines)


FOCUS = {  # the rules restated in the symbols of the text state, for the teacher
    "frozenlake": ("S is where the player starts, G is the goal, H is a hole (never step on it), F is safe ice.",
                   "Find a route from S to G that touches no H."),
    "maze": ("A direction listed for a cell is a legal move to the neighbouring cell.",
             "A direction not listed is a wall: that move fails.", "Find a route from Start to Target through open sides only."),
    "minibehaviour": ("Table cells are blocked at all times.",
                      "The printer's cell is blocked until PICK; after PICK the printer is carried and its cell is free.",
                      "Walk to a printer-adjacent cell and PICK, then walk to a table-adjacent cell and DROP."),
}


def teacher_context(state, with_plan=True):
    """The teacher's privileged context (method.md §2.1): what it is, the text state (for Maze also a wall
    table), the rules restated in its symbols, by default the reference plan, and the answer request.
    with_plan=False drops the plan line and the clause about not mentioning it, together."""
    task, n = state["task"], state["level"]
    lines = [f"Privileged text context of a {NAMES[task]} map, for the teacher.",
             "The description below is complete: solve the task from it"
             + ("; do not say that a reference plan was given." if with_plan else "."), "", text_state(state)]
    if task == "maze":
        lines += ["Walls by cell (sides U R D L, 1 = wall, 0 = open):"]
        lines += [" ".join("".join("0" if a in state["open"][r][c] else "1" for a in "URDL") for c in range(n))
                  for r in range(n)]
    lines += ["", "Reasoning focus:"] + [f"- {rule}" for rule in FOCUS[task]]
    if with_plan:
        lines.append(f"Reference action plan: {plan_text(state['plan'], task)}")
    lines.append("Solve the task and end with exactly one <answer>...</answer> block.")
    return "\n".join(lines)


# ---------------------------------------------------------------- prompts and the output contract (method.md §3)
GOAL = {"frozenlake": "move the player from its start cell to the goal without falling into a hole",
        "maze": "move the player through the corridors to the target",
        "minibehaviour": "walk the agent next to the printer, pick it up, carry it next to the table and drop it"}
RULES = {"frozenlake": "Moves: L (left), D (down), R (right), U (up), one cell each. Stepping into a hole fails; "
                       "moving off the grid is illegal and fails; reaching the goal succeeds.",
         "maze": "Moves: L (left), D (down), R (right), U (up), one cell each. Moving through a wall (the outer "
                 "border included) is illegal and fails; reaching the target succeeds.",
         "minibehaviour": "Actions: L (left), D (down), R (right), U (up), one cell each, PICK and DROP. The agent may "
                          "never leave the grid, enter a table cell, or enter the printer's cell before picking it up. "
                          "PICK works only when 4-adjacent to the printer; DROP works only while carrying it and "
                          "4-adjacent to a table cell, and completes the task. Any illegal action fails."}
RECAP = {"frozenlake": "the map size, the player, the goal and the holes",
         "maze": "the map size, the player, the target and the open directions of every cell",
         "minibehaviour": "the room size, the agent, the printer and the table cells"}
ANSWER_STYLE = {"frozenlake": "in compact letters, e.g. <answer>UUR</answer>", "maze": "in compact letters, e.g. <answer>UUR</answer>",
                "minibehaviour": "comma-separated, e.g. <answer>U,PICK,R,R,DROP</answer>"}
# Worked examples quoted in every prompt: small, hand-made, checked by a test to be valid and optimal.
EXAMPLES = {
    "frozenlake": {"task": "frozenlake", "level": 3, "start": [0, 0], "goal": [2, 2], "holes": [[1, 1]]},
    "maze": {"task": "maze", "level": 3, "start": [0, 1], "target": [1, 1], "difficulty": "medium",
             "open": [["R", "RL", "DL"], ["RD", "RL", "UL"], ["UR", "RL", "L"]]},
    "minibehaviour": {"task": "minibehaviour", "level": 4, "agent": [0, 0], "printer": [0, 3],
                      "table": [[2, 0], [2, 1], [2, 2], [3, 0], [3, 1], [3, 2]]},
}
for _example in EXAMPLES.values():
    _example["plan"] = solve(_example)


def _runs(moves):
    runs = []
    for a in moves:
        if runs and runs[-1][0] == a:
            runs[-1][1] += 1
        else:
            runs.append([a, 1])
    words = [f"{WORDS[a]} {k}" for a, k in runs]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + ", then " + words[-1]


def reference_response(state):
    """A correct response: a short recap, one sentence about the route, the plan in <answer> tags."""
    task, n, plan, f = state["task"], state["level"], state["plan"], facts(state)
    if task == "frozenlake":
        recap = f"Map {n}x{n}. Player at {fmt(f['player'])}, goal at {fmt(f['goal'])}. Holes: {fmt_list(f['holes'])}."
        route = f"Route: {_runs(plan)}, {'avoiding the holes and ' if f['holes'] else ''}reaching the goal."
    elif task == "maze":
        recap = (f"Maze {n}x{n}. Player at {fmt(f['player'])}, target at {fmt(f['target'])}. "
                 f"Open directions: {'; '.join(_open_lines(f['open']))}.")
        route = f"Route: {_runs(plan)}, reaching the target."
    else:
        recap = (f"Room {n}x{n}. Agent at {fmt(f['agent'])}, printer at {fmt(f['printer'])}. "
                 f"Table cells: {fmt_list(f['table'])}.")
        pick = plan.index("PICK")
        world, sim = World(state), World(state).start
        for a in plan[:pick]:
            sim = world.step(sim, a)[0]
        at_printer = fmt(sim[:2])
        for a in plan[pick + 1:-1]:
            sim = world.step(sim, a)[0]
        walk1 = f"walk to {at_printer}, " if pick else ""
        walk2 = f"walk to {fmt(sim[:2])} and " if len(plan) - pick > 2 else "then "
        route = f"Route: {walk1}pick up the printer, {walk2}drop it at the table."
    return f"{recap}\n{route}\n<answer>{plan_text(plan, task)}</answer>"


@lru_cache(maxsize=None)
def _instructions(task):
    return (f"Goal: {GOAL[task]}.\nCoordinates are (row, col), 0-based, (0,0) at the top-left; rows grow downward.\n"
            f"Rules: {RULES[task]}\n"
            f"Answer format: first briefly restate {RECAP[task]}; then write exactly one sentence describing the "
            f"route; then give the shortest plan as exactly one <answer>...</answer> holding only the actions, "
            f"{ANSWER_STYLE[task]}. No step-by-step narration.\n"
            f"Example answer for another map:\n{reference_response(EXAMPLES[task])}")


@lru_cache(maxsize=None)
def picture_legend(task):
    return "Picture: " + "; ".join(desc for _, desc, _ in LEGEND[task]) + "; thin lines separate the cells."


def _user(*content):
    return [{"role": "user", "content": list(content)}]


def _text(text):
    return {"type": "text", "text": text}


def student_prompt(state):
    task = state["task"]
    return (f"You are a planning agent. The image shows a {NAMES[task]} map.\n{picture_legend(task)}\n"
            f"{_instructions(task)}\nNow plan for the map in the image.")


def student_messages(state, image):
    """One user turn: instructions, then the image (a path or a PIL image) last. No system turn."""
    return _user(_text(student_prompt(state)), {"type": "image", "image": image})


def text_student_messages(state):
    task = state["task"]
    return _user(_text(f"You are a planning agent. Below is a text description of a {NAMES[task]} map.\n"
                       f"{_instructions(task)}\nNow plan for this map:\n{text_state(state)}"))


TEXT_LEGEND = {"frozenlake": "Text map legend: S start (the player), F frozen (safe), H hole, G goal.",
               "maze": "The state lists the open directions of every cell and a wall table; a missing side is a wall.",
               "minibehaviour": "Text grid legend: A agent, P printer, T table, . free floor."}


def teacher_messages(state, with_plan=True):
    task = state["task"]
    system = (f"You are a text-only planning teacher for {NAMES[task]}: you receive the exact state of a map as "
              f"text, not an image.\n{TEXT_LEGEND[task]}\n{_instructions(task)}")
    return [{"role": "system", "content": [_text(system)]}] + _user(_text(teacher_context(state, with_plan)))


# ---------------------------------------------------------------- the one parser and scorer (method.md §4)
OPEN_TAG, CLOSE_TAG = re.compile("<answer>", re.IGNORECASE), re.compile("</answer>", re.IGNORECASE)
TOKENS = {"left": "L", "right": "R", "up": "U", "down": "D", "←": "L", "→": "R", "↑": "U", "↓": "D",
          "pick": "PICK", "pickup": "PICK", "pick_up": "PICK", "drop": "DROP", "putdown": "DROP"}


def last_answer_block(text):
    """The inside of the last <answer>...</answer> block (case-insensitive), or None. One pass, linear
    (a lazy regex is quadratic on many unclosed tags)."""
    body, pos, text = None, 0, text or ""
    while (opened := OPEN_TAG.search(text, pos)) and (closed := CLOSE_TAG.search(text, opened.end())):
        body, pos = text[opened.end():closed.start()], closed.end()
    return body


def parse_plan(text, task):
    """Actions in the last <answer>...</answer> block of `text`, or None (no block, invalid token, empty)."""
    body = last_answer_block(text)
    if body is None:
        return None
    body = body.replace("*", "").replace("`", "").strip().rstrip(".").lower()
    body = re.sub(r"\bpick\s+up\b", "pickup", body)
    body = re.sub(r"\bput\s+down\b", "putdown", body).replace("->", " ")
    plan = []
    for token in re.split(r"[,;\s]+", body):
        if not token:
            continue
        if token in TOKENS:
            plan.append(TOKENS[token])
        elif re.fullmatch(r"[lrud]+|[←→↑↓]+", token):
            plan += [TOKENS[ch] if ch in TOKENS else ch.upper() for ch in token]
        else:
            return None
    if not plan or (task != "minibehaviour" and {"PICK", "DROP"} & set(plan)):
        return None
    return plan


def score_planning(state, response):
    """Per-episode metrics; response None (an errored episode) scores as a failure."""
    plan = parse_plan(response, state["task"]) if response is not None else None
    if plan is None:
        return {"parse_ok": False, "success": False, "optimal": False, "illegal": False, "plan": None}
    result = simulate(state, plan)
    return {"parse_ok": True, "success": result["success"], "illegal": result["illegal"], "plan": plan,
            "optimal": result["success"] and len(plan) == len(state["plan"])}


def aggregate(episodes):
    """Means per (task, level) and per task, and the macro mean over tasks of the per-task means."""
    skip = {"task", "level", "seed", "error"}

    def summarise(eps):
        keys = sorted({k for e in eps for k, v in e.items() if k not in skip and isinstance(v, (bool, int, float))})
        # a key only some rows have (tiny.py's question types) is a mean over those rows; an errored row counts 0
        has = {k: [e for e in eps if k in e or e.get("error")] for k in keys}
        out = {k: sum(float(e.get(k) or 0) for e in has[k]) / len(has[k]) for k in keys}
        return {**out, "n": len(eps), "errors": sum(bool(e.get("error")) for e in eps)}

    by_task = {}
    for e in episodes:
        by_task.setdefault(e["task"], []).append(e)
    per_level = {t: {lv: summarise([e for e in eps if e["level"] == lv]) for lv in sorted({e["level"] for e in eps})}
                 for t, eps in by_task.items()}
    per_task = {t: summarise(eps) for t, eps in by_task.items()}
    metrics = set.intersection(*(set(s) - {"n", "errors"} for s in per_task.values())) if per_task else set()
    macro = {k: sum(s[k] for s in per_task.values()) / len(per_task) for k in sorted(metrics)}
    return {"per_level": per_level, "per_task": per_task, "macro": macro}


# ---------------------------------------------------------------- perception QA (method.md §5.1)
QUESTIONS = {
    "frozenlake": (("size", "What is the map size?"), ("player", "Where is the player?"),
                   ("goal", "Where is the goal?"), ("holes", "Where are all the holes?")),
    "maze": (("size", "What is the map size?"), ("player", "Where is the player?"), ("target", "Where is the target?"),
             ("open", "What are the open directions of every cell? One line per cell, like (r, c): up, down."),
             ("legal_moves", "Which moves are legal from the player's cell?")),
    "minibehaviour": (("size", "What is the room size?"), ("agent", "Where is the agent?"),
                      ("printer", "Where is the printer?"), ("table", "Which cells does the table cover?"),
                      ("printer_adjacent", "Which free cells are 4-adjacent to the printer?"),
                      ("table_adjacent", "Which free cells are 4-adjacent to the table?"),
                      ("legal_moves", "Which actions are legal for the agent now?")),
}
POS_RE = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)")
ACTION_WORDS_RE = re.compile(r"\b(up|right|down|left|pick|drop)\b")


def _answer_text(value):
    if isinstance(value, int):
        return f"{value}x{value}"
    if isinstance(value, tuple):
        return fmt(value, space=True)
    if isinstance(value, dict):
        return "\n" + "\n".join(_open_lines(value, space=True))
    if value and isinstance(value[0], str):
        return ", ".join(value)
    return fmt_list(value, space=True)


def _answer_matches(value, text):
    """Grade one answer: positions as sets (order-free), words as sets, sizes as numbers."""
    if text is None:
        return False
    text = text.lower()
    positions = {(int(r), int(c)) for r, c in POS_RE.findall(text)}
    if isinstance(value, int):
        m = re.search(r"(\d+)\s*[x×]\s*(\d+)", text)
        return bool(m) and int(m.group(1)) == int(m.group(2)) == value
    if isinstance(value, tuple):
        return positions == {value}
    if isinstance(value, dict):
        got = {}
        for line in text.splitlines():
            m = POS_RE.search(line)
            if m:
                got[(int(m.group(1)), int(m.group(2)))] = set(ACTION_WORDS_RE.findall(line[m.end():]))
        return got == {p: set(words) for p, words in value.items()}
    if value and isinstance(value[0], str) or not value and not positions:
        return set(ACTION_WORDS_RE.findall(text)) == set(value)
    return positions == set(value)


def _numbered(text):
    """{question number: answer text} of a numbered answer `1. ...\n2. ...`."""
    parts = re.split(r"(?m)^\s*(\d+)\s*[.):]", text or "")
    return {int(parts[i]): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def perception_prompt(state):
    task = state["task"]
    questions = "\n".join(f"{i}. {q}" for i, (_, q) in enumerate(QUESTIONS[task], 1))
    return (f"The image shows a {NAMES[task]} map.\n{picture_legend(task)}\nCoordinates are (row, col), 0-based, "
            f"(0,0) at the top-left. Answer each question on its own numbered line: sizes like 4x4, positions like "
            f"(r, c), lists comma-separated in row-major order (none when empty), directions as words.\n{questions}")


def perception_messages(state, image):
    return _user(_text(perception_prompt(state)), {"type": "image", "image": image})


def perception_answer(state):
    f = facts(state)
    lines = (f"{i}.{'' if isinstance(f[key], dict) else ' '}{_answer_text(f[key])}"
             for i, (key, _) in enumerate(QUESTIONS[state["task"]], 1))
    return "\n".join(lines)


def score_perception(state, response):
    f, sections = facts(state), _numbered(response)
    result = {key: _answer_matches(f[key], sections.get(i)) for i, (key, _) in enumerate(QUESTIONS[state["task"]], 1)}
    return {**result, "all_correct": all(result.values())}


def score_row(row, response):
    """Score a response to any data row: planning / text-planning / perception / dynamics / vision (tiny.py)."""
    if row["kind"] in ("planning", "text-planning", "teacher"):
        return score_planning(row["state"], response)
    if row["kind"] == "perception":
        return score_perception(row["state"], response)
    if row["kind"] == "dynamics":
        import dynamics

        return dynamics.score(row, response)
    if row["kind"] == "vision":
        import tiny

        return tiny.score_grid(tiny.state_to_grid(row["state"]), response)
    raise ValueError(f"unknown row kind {row['kind']!r}")


# ---------------------------------------------------------------- data sets on disk (method.md §6)
def collect(task, level, split, count):
    """`count` distinct (seed, state) pairs of one level for one split, or a one-line ValueError.
    A state belongs to the split whose share of the hash space its content hashes into."""
    base, lo, hi = SPLITS[split]
    quota = {"easy": -(-count // 3), "medium": -(-(count - 1) // 3) if count > 1 else 0} if task == "maze" else {}
    if task == "maze":
        quota["hard"] = count - quota["easy"] - quota["medium"]
    max_seeds, window = 20000 + int(10 * count / (hi - lo)), 5000
    seen, found, found_before = set(), [], 0
    for tried in range(max_seeds):
        if tried and tried % window == 0:  # new states only get rarer: give up once the cap is out of reach
            if (len(found) - found_before) / window * (max_seeds - tried) < count - len(found):
                break
            found_before = len(found)
        seed = base + tried
        state = draft(task, level, seed)
        if state is None:
            continue
        key = json.dumps(state, sort_keys=True, separators=(",", ":"))
        share = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
        if not lo <= share < hi or key in seen:
            continue
        if quota and quota[state["difficulty"]] == 0:
            continue
        state["plan"] = solve(state)
        if state["plan"] is None:
            continue
        seen.add(key)
        if quota:
            quota[state["difficulty"]] -= 1
        found.append((seed, state))
        if len(found) == count:
            return found
    raise ValueError(f"{task} level {level}: only {len(found)} distinct instances found for split {split} "
                     f"after {tried + 1 if tried == max_seeds - 1 else tried} seeds; ask for fewer")


# On disk every row has the same keys with the same types ("subkind" is "" outside dynamics), and
# `state` / `query` (whose fields differ between tasks and between dynamics questions) are JSON-encoded
# strings: `datasets` infers one schema from the first block of the file and cannot cast later rows
# with other fields or types. `load_split` decodes them again.
ROW_KEYS = ("id", "task", "level", "seed", "split", "kind", "subkind", "state", "plan", "image", "query", "messages",
            "answer")


def _message_row(base, kind, prompt_messages, answer, **extra):
    messages = prompt_messages + [{"role": "assistant", "content": [_text(answer)]}]
    return {**base, "kind": kind, **extra, "messages": messages, "answer": answer}


def _disk_row(row):
    encoded = {**row, "state": json.dumps(row["state"], separators=(",", ":")), "subkind": row.get("subkind", ""),
               "query": json.dumps(row.get("query") or {}, separators=(",", ":"))}
    return json.dumps({k: encoded.get(k) for k in ROW_KEYS}, separators=(",", ":"))


def instance_rows(seed, state, split, kinds, image_size, cell_size=None, style="plain"):
    """(rows of one instance in kind order, [(relative path, picture)] they reference)."""
    task, level = state["task"], state["level"]
    name = f"{task}-{level}-{seed:06d}"
    image = f"images/{name}.png"
    pictures = [(image, render(state, image_size, cell_size, style))] if {"planning", "perception", "dynamics"} & set(kinds) else []
    base = {"id": name, "task": task, "level": level, "seed": seed, "split": split, "state": state, "plan": state["plan"]}
    rows = []
    for kind in kinds:
        row_base = {**base, "id": f"{name}-{kind}"}
        if kind == "planning":
            rows.append(_message_row(row_base, kind, student_messages(state, image), reference_response(state), image=image))
        elif kind == "text-planning":
            rows.append(_message_row(row_base, kind, text_student_messages(state), reference_response(state), image=None))
        elif kind == "teacher":  # the teacher's prompt (privileged context): for a tiny base that must read it
            rows.append(_message_row(row_base, kind, teacher_messages(state), reference_response(state), image=None))
        elif kind == "perception":
            rows.append(_message_row(row_base, kind, perception_messages(state, image), perception_answer(state), image=image))
        elif kind == "dynamics":
            import dynamics

            for sub, question, answer, query in dynamics.questions(state, seed):
                content = [_text(question), {"type": "image", "image": image}]
                if sub == "inverse":
                    after = f"images/{name}-after.png"
                    pictures.append((after, render(dynamics.moved(state, query["after"]), image_size, cell_size, style)))
                    content.append({"type": "image", "image": after})
                rows.append(_message_row({**base, "id": f"{name}-dynamics-{sub}"}, kind, _user(*content), answer,
                                         image=image, subkind=sub, query=query))
    return rows, pictures


def _rows_chunk(job):
    """JSON lines of a chunk of instances; their pictures are written as PNGs on the way."""
    items, split, kinds, image_size, cell_size, style, out_dir = job
    lines = []
    for seed, state in items:
        rows, pictures = instance_rows(seed, state, split, kinds, image_size, cell_size, style)
        for path, picture in pictures:
            picture.save(Path(out_dir) / path)
        lines += [_disk_row(row) for row in rows]
    return lines


def check_request(tasks, levels, kinds, image_size, cell_size=None, style="plain"):
    """One-line ValueError on an unknown task / kind or a level / image size out of range."""
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
        lo, hi = LEVEL_RANGE[task]
        for level in levels.get(task, ()):
            if not lo <= level <= hi:
                raise ValueError(f"{task} level {level} is out of range {lo}..{hi}")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (choose from {', '.join(KINDS)})")
    if not 64 <= image_size <= 2048:
        raise ValueError(f"image size {image_size} is out of range 64..2048")
    if cell_size is not None:
        largest = max((level for task in tasks for level in levels.get(task, ())), default=0)
        if not 8 <= cell_size or largest * cell_size > image_size:
            raise ValueError(f"cell size {cell_size} does not fit level {largest} into {image_size} px (or is below 8)")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r} (choose from {', '.join(STYLES)})")
    if style == "sprites" and "frozenlake" in tasks:
        sprite_folder()


def make_split(out_dir, split, per_level, tasks=None, levels=None, kinds=("planning", "perception"), workers=1,
               image_size=256, cell_size=None, style="plain"):
    """Write out_dir/data.jsonl and out_dir/images/ for one split, atomically (cli.atomic_dir).
    levels: a list applied to every task, or {task: levels}; default DEFAULT_LEVELS."""
    tasks = list(tasks or TASKS)
    levels = {t: tuple(levels.get(t, DEFAULT_LEVELS[t])) if isinstance(levels, dict) else tuple(levels or DEFAULT_LEVELS[t])
              for t in tasks if t in TASKS} if tasks else {}
    check_request(tasks, levels, kinds, image_size, cell_size, style)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if per_level < 1:
        raise ValueError(f"--per-level must be at least 1, got {per_level}")
    out = Path(out_dir).absolute()
    if out.exists() and not (out / "data.jsonl").exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a data directory; refusing to overwrite it")
    anchor = next(p for p in out.parents if p.exists())
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write into {anchor}")
    instances = [collect(task, level, split, per_level) for task in tasks for level in levels[task]]
    with cli.atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        chunk = 50
        jobs = [(items[i:i + chunk], split, tuple(kinds), image_size, cell_size, style, str(tmp))
                for items in instances for i in range(0, len(items), chunk)]
        with open(tmp / "data.jsonl", "w") as f:
            if workers > 1:
                with multiprocessing.get_context("spawn").Pool(workers) as pool:
                    for lines in pool.imap(_rows_chunk, jobs):
                        f.writelines(line + "\n" for line in lines)
            else:
                for job in jobs:
                    f.writelines(line + "\n" for line in _rows_chunk(job))
    return out


STATE_KEYS = {"frozenlake": ("start", "goal", "holes"), "maze": ("start", "target", "open"),
              "minibehaviour": ("agent", "printer", "table"), "grid": ("objects", "question")}


def row_problem(row):
    """What is wrong with a data row (types and contents, with the offending value), or None."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {type(row).__name__}"
    missing = [k for k in ("id", "task", "level", "kind", "state", "plan", "messages") if k not in row]
    if missing:
        return f"row misses {', '.join(missing)}"
    task, kind = row["task"], row["kind"]
    if (task, kind) != ("grid", "vision") and (task not in TASKS or kind not in KINDS):
        return f"unknown task/kind {task!r}/{kind!r} (tasks: {', '.join(TASKS)}; kinds: {', '.join(KINDS)})"
    if not isinstance(row["level"], int) or isinstance(row["level"], bool):
        return f"level must be an integer, got {row['level']!r}"
    state = row["state"]
    if not isinstance(state, dict) or state.get("task") != task or state.get("level") != row["level"]:
        return f"state does not describe this {task} level {row['level']} row"
    absent = [k for k in STATE_KEYS[task] if k not in state]
    if absent:
        return f"state misses {', '.join(absent)}"
    if not isinstance(row["plan"], list) or not all(isinstance(a, str) for a in row["plan"]):
        return f"plan must be a list of actions, got {row['plan']!r}"
    messages = row["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return "messages must be a list of {role, content} objects"
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            return f"unknown message role {m.get('role')!r}"
        content = m.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(items, list):
            return f"message content must be a string or a list, got {type(content).__name__}"
        for item in items:
            if not isinstance(item, dict) or item.get("type") not in ("text", "image") \
                    or not isinstance(item.get(item.get("type")), str):
                return f"message item must be {{type: text, text: str}} or {{type: image, image: path}}, got {item!r}"
    if not any(m["role"] == "assistant" for m in messages):
        return "messages hold no assistant turn"
    return None


def load_split(data_dir, kinds=None):
    """Rows of data_dir/data.jsonl (optionally only `kinds`), with image paths made absolute.
    FileNotFoundError / ValueError with a one-line message on a missing or malformed split."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    path = root / "data.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no data.jsonl in {root}")

    resolved = {}

    def resolve(rel, where):
        if rel not in resolved:
            full = (root / rel).resolve()
            if not full.is_file():
                raise FileNotFoundError(f"{where}: image not found: {full}")
            resolved[rel] = str(full)
        return resolved[rel]

    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            where = f"{path}:{number}"
            if not line.strip():
                continue  # a trailing blank line is not a row
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
            if kinds and isinstance(row, dict) and row.get("kind") not in kinds:
                continue
            try:  # state and query are JSON strings on disk (see ROW_KEYS)
                if isinstance(row, dict):
                    row.update({k: json.loads(row[k]) for k in ("state", "query") if isinstance(row.get(k), str)})
            except json.JSONDecodeError:
                raise ValueError(f"{where}: state or query is not JSON") from None
            problem = row_problem(row)
            if problem:
                raise ValueError(f"{where}: {problem}")
            if row.get("image"):
                row["image"] = resolve(row["image"], where)
            for message in row["messages"]:
                for item in message["content"]:
                    if item.get("type") == "image" and isinstance(item.get("image"), str):
                        item["image"] = resolve(item["image"], where)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- command line
def _levels_arg(tokens):
    """`3 4` -> [3, 4] for every task; `frozenlake=3,4 maze=3` -> {task: levels} (unnamed tasks: default)."""
    if not tokens:
        return None
    try:
        if all("=" not in t for t in tokens):
            return [int(t) for t in tokens]
        pairs = [t.split("=", 1) for t in tokens]
        return {task: [int(level) for level in levels.split(",")] for task, levels in pairs}
    except ValueError:
        raise ValueError(f"--levels: expected integers or task=l1,l2 pairs, got {' '.join(tokens)!r}") from None


def _show(args):
    state = generate(args.task, args.level, args.seed)
    if state is None:
        raise ValueError(f"{args.task} level {args.level} seed {args.seed} is skipped (no valid instance)")
    out = Path(args.out or f"{args.task}-{args.level}-{args.seed}.png")
    section = lambda title, text: print(f"===== {title}\n{text}\n")
    section("state (JSON)", json.dumps(state))
    section("teacher context", teacher_context(state))
    section("text-student state", text_state(state))
    section("student prompt (the image follows)", student_messages(state, str(out))[0]["content"][0]["text"])
    section("text-student prompt", text_student_messages(state)[0]["content"][0]["text"])
    teacher = teacher_messages(state)
    section("teacher system turn", teacher[0]["content"][0]["text"])
    section("reference response", reference_response(state))
    section("perception prompt", perception_prompt(state))
    section("perception answer", perception_answer(state))
    import dynamics

    for sub, question, answer, _ in dynamics.questions(state, args.seed):
        section(f"dynamics {sub}", f"{question}\n-> {answer}")
    render(state, args.image_size, args.cell_size, args.frozenlake_style).save(out)
    print(f"picture written to {out}")


def main(argv=None):
    parser = cli.Parser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
    data = sub.add_parser("data", help="write one split: DIR/data.jsonl and DIR/images/")
    data.add_argument("--out", required=True, help="output directory (replaced atomically)")
    data.add_argument("--split", required=True, choices=tuple(SPLITS), help="which split (disjoint seeds and states)")
    data.add_argument("--per-level", type=int, required=True, help="instances per (task, level)")
    data.add_argument("--tasks", nargs="+", default=list(TASKS), help="tasks to include (default: all three)")
    data.add_argument("--levels", nargs="+",
                      help="levels for every task (3 4), or per task (frozenlake=3,4 maze=3); default DEFAULT_LEVELS")
    data.add_argument("--kinds", default="planning,perception", help=f"comma-separated row kinds from {','.join(KINDS)}")
    data.add_argument("--workers", type=cli.positive_int, default=1, help="processes rendering and writing rows")
    data.add_argument("--image-size", type=int, default=256, help="picture side in pixels (tiny models: 160)")
    data.add_argument("--cell-size", type=int, default=None,
                      help="draw each grid cell this many pixels wide at the top-left (tiny models: 32, one merged "
                           "vision token per cell); default: the grid fills the picture")
    data.add_argument("--frozenlake-style", default="plain", choices=STYLES,
                      help="plain: drawn with PIL primitives, no assets; sprites: gymnasium's FrozenLake sprites, as the "
                           "VSP benchmark's pictures (needs gymnasium<1.4 installed)")
    show = sub.add_parser("show", help="print every view, prompt and QA pair of one instance and write its picture")
    show.add_argument("task", choices=TASKS, help="the task")
    show.add_argument("--level", type=int, required=True, help="grid side")
    show.add_argument("--seed", type=int, required=True, help="instance seed")
    show.add_argument("--out", help="picture path (default TASK-LEVEL-SEED.png)")
    show.add_argument("--image-size", type=int, default=256, help="picture side in pixels")
    show.add_argument("--cell-size", type=int, default=None, help="cell side in pixels (see data --cell-size)")
    show.add_argument("--frozenlake-style", default="plain", choices=STYLES, help="see data --frozenlake-style")
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            kinds = [k for k in args.kinds.split(",") if k]
            out = make_split(args.out, args.split, args.per_level, args.tasks, _levels_arg(args.levels), kinds,
                             args.workers, args.image_size, args.cell_size, args.frozenlake_style)
            print(f"wrote {out / 'data.jsonl'}")
        else:
            check_request([args.task], {args.task: [args.level]}, [], args.image_size, args.cell_size,
                          args.frozenlake_style)
            _show(args)
    except (ValueError, OSError) as e:
        cli.fail(e)


if __name__ == "__main__":
    main()
