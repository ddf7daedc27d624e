"""The three grid-world planning tasks of MGSD: generation, text views, prompts, the one
parser / simulator / scorer and the perception questions (docs/method.md §1-§5).

  frozenlake     walk from S to G; a hole ends the episode, a move off the grid is illegal.
  maze           a perfect maze carved by randomised DFS; moving through a wall is illegal.
  minibehaviour  walk next to the printer, PICK it, walk next to the 2x3 table, DROP it.
Every instance is a pure function of (task, level, seed) and carries its shortest plan, found by
breadth-first search over the simulator's own `step`, so the planner, the simulator and the scorer
can never disagree. One parser (`parse_plan`) and one simulator (`simulate`) serve the training
reward, validation and every evaluation. Pictures are PIL tiles (no assets); a cell's centre shows
one flat colour per cell type (mgsd/pictures.py's `LEGEND`, the table the prompts describe).

Data splits on disk (the row kinds, the writer, the loader, the scorer of any row, the command line):
mgsd/splits.py.
Commands: README.md, "Data".
"""
import random
import re
from collections import deque
from functools import lru_cache

from mgsd.pictures import LEGEND

TASKS = ("frozenlake", "maze", "minibehaviour")
DEFAULT_LEVELS = {"frozenlake": (3, 4, 5, 6, 7, 8), "maze": (3, 4, 5, 6), "minibehaviour": (5, 6)}
LEVEL_RANGE = {"frozenlake": (2, 10), "maze": (2, 10), "minibehaviour": (4, 10)}
NAMES = {"frozenlake": "FrozenLake", "maze": "Maze", "minibehaviour": "MiniBehaviour"}
MOVES = {"U": (-1, 0), "R": (0, 1), "D": (1, 0), "L": (0, -1)}  # BFS tries actions in this order
WORDS = {"U": "up", "R": "right", "D": "down", "L": "left"}
ACTIONS = {"frozenlake": ("U", "R", "D", "L"), "maze": ("U", "R", "D", "L"), "minibehaviour": ("U", "R", "D", "L", "PICK", "DROP")}
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


def trajectory(state, actions):
    """([every sim visited, the start first: one more than the steps taken], status) of `actions` from the initial
    state, stopping at the first success or failure (method.md §4); an illegal action leaves the position as it was."""
    world = World(state)
    sims, status = [world.start], "ok"
    for a in actions:
        nxt, status = world.step(sims[-1], a)
        sims.append(nxt if status != "illegal" else sims[-1])
        if status != "ok":
            break
    return sims, status


def rollout(state, actions):
    """(final sim, status, steps): trajectory's last position."""
    sims, status = trajectory(state, actions)
    return sims[-1], status, len(sims) - 1


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


def direct_response(state):
    """The plan alone, the target of the paper's direct-SFT baseline (the answer-only format of `_instructions`)."""
    return f"<answer>{plan_text(state['plan'], state['task'])}</answer>"


@lru_cache(maxsize=None)
def _instructions(task, direct=False):
    """The shared instructions. direct: the answer-only format of the paper's direct-SFT baseline, whose
    instructions ask for the final plan only, without restating the map or explaining the route."""
    answer = (f"give only the shortest plan as exactly one <answer>...</answer> holding only the actions, "
              f"{ANSWER_STYLE[task]}. Do not restate the map and do not explain your reasoning." if direct else
              f"first briefly restate {RECAP[task]}; then write exactly one sentence describing the route; then give "
              f"the shortest plan as exactly one <answer>...</answer> holding only the actions, {ANSWER_STYLE[task]}. "
              f"No step-by-step narration.")
    example = (direct_response if direct else reference_response)(EXAMPLES[task])
    return (f"Goal: {GOAL[task]}.\nCoordinates are (row, col), 0-based, (0,0) at the top-left; rows grow downward.\n"
            f"Rules: {RULES[task]}\nAnswer format: {answer}\nExample answer for another map:\n{example}")


@lru_cache(maxsize=None)
def picture_legend(task):
    return "Picture: " + "; ".join(desc for _, desc, _ in LEGEND[task]) + "; thin lines separate the cells."


def _user(*content):
    return [{"role": "user", "content": list(content)}]


def _text(text):
    return {"type": "text", "text": text}


def student_prompt(state, direct=False):
    task = state["task"]
    return (f"You are a planning agent. The image shows a {NAMES[task]} map.\n{picture_legend(task)}\n"
            f"{_instructions(task, direct)}\nNow plan for the map in the image.")


def student_messages(state, image, direct=False):
    """One user turn: instructions, then the image (a path or a PIL image) last. No system turn.
    direct: the answer-only instructions (`_instructions`)."""
    return _user(_text(student_prompt(state, direct)), {"type": "image", "image": image})


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
        # a key only some rows have (the grids' question types) is a mean over those rows; an errored row counts 0
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


if __name__ == "__main__":  # `python envs.py data / show`: the data stage's command line lives with the writer,
    import os  # mgsd/splits.py, which builds on this module: handed over as a process, not imported
    import sys

    root = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    os.execv(sys.executable, [sys.executable, "-m", "mgsd.splits", *sys.argv[1:]])
