"""Dynamics QA, World2VLM-style (method.md §5.2): an ablation's stage-1 data (`envs.py data --kinds
dynamics`), with exact labels from the one simulator of envs.py.
  forward  the picture and 1-4 random actions -> the final (r, c) and the status
  inverse  the pictures before and after a legal 1-3 move walk -> a shortest walk between them
  verify   the reference plan or, half of the time, a copy with one action replaced, dropped or
           repeated -> does it solve the map (yes / no)
"""
import re

from envs import ACTIONS, MOVES, NAMES, POS_RE, World, _rng, fmt, parse_plan, rollout, simulate, solve

STATUS_WORDS = {"ok": "ok", "fell": "fell into hole", "illegal": "illegal", "success": "goal reached"}
STATUS_RE = re.compile(r"\b(fell into (?:a )?hole|goal reached|dropped|illegal|ok)\b")


def moved(state, pos):
    key = "agent" if state["task"] == "minibehaviour" else "start"
    return {**state, key: list(pos)}


def questions(state, seed):
    """[(subkind, question, answer, query)] of one instance, deterministic in (task, level, seed); query
    holds what the scorer needs."""
    task, rng = state["task"], _rng("dynamics/" + state["task"], state["level"], seed)
    name, sep = NAMES[task], "," if task == "minibehaviour" else ""
    actions = [rng.choice(ACTIONS[task]) for _ in range(rng.randint(1, 4))]
    sim, status, _ = rollout(state, actions)
    status_word = "dropped" if task == "minibehaviour" and status == "success" else STATUS_WORDS[status]
    statuses = {"frozenlake": "ok, fell into hole, illegal, goal reached", "maze": "ok, illegal, goal reached",
                "minibehaviour": "ok, illegal, dropped"}[task]
    forward = (f"The image shows a {name} map. Starting from it, the actions {sep.join(actions)} are applied, stopping "
               f"at the first failure or success. Give the final (r, c) position and the status ({statuses}) as: "
               f"(r, c), status")
    out = [("forward", forward, f"{fmt(sim[:2], True)}, {status_word}",
            {"actions": actions, "final": list(sim[:2]), "status": status_word})]
    world, sim, walk = World(state), World(state).start, []
    for _ in range(rng.randint(1, 3)):  # a legal walk that neither finishes nor fails the task
        options = [a for a in MOVES if world.step(sim, a)[1] == "ok"]
        if not options:
            break
        a = rng.choice(options)
        sim = world.step(sim, a)[0]
        walk.append(a)
    if sim[:2] != world.start[:2]:
        after = list(sim[:2])
        shortest = solve(state, lambda s, st: st == "ok" and list(s[:2]) == after, MOVES)
        inverse = (f"The first image shows a {name} map, the second the same map after a few moves of the "
                   f"{'agent' if task == 'minibehaviour' else 'player'}. Give a shortest move sequence between them "
                   f"as <answer>...</answer>.")
        out.append(("inverse", inverse, f"<answer>{sep.join(shortest)}</answer>", {"after": after, "length": len(shortest)}))
    candidate = list(state["plan"])
    if rng.random() < 0.5:  # a perturbed plan: one action replaced, dropped or repeated
        i = rng.randrange(len(candidate))
        edit = rng.choice(("replace", "drop", "repeat"))
        candidate[i:i + 1] = {"replace": [rng.choice(ACTIONS[task])], "drop": [], "repeat": [candidate[i]] * 2}[edit]
    verdict = "yes" if candidate and simulate(state, candidate)["success"] else "no"
    verify = f"The image shows a {name} map. Does the plan {sep.join(candidate) or '(empty)'} solve it? Answer yes or no."
    out.append(("verify", verify, verdict, {"candidate": candidate}))
    return out


def score(row, response):
    state, query, sub = row["state"], row["query"], row["subkind"]
    text = (response or "").lower()
    if sub == "forward":
        positions = [[int(r), int(c)] for r, c in POS_RE.findall(text)]
        statuses = {("fell into hole" if w.startswith("fell") else w) for w in STATUS_RE.findall(text)}
        return {"correct": bool(positions) and positions[-1] == query["final"] and statuses == {query["status"]}}
    if sub == "inverse":
        walk = parse_plan(response, state["task"]) if response else None
        end, status, _ = rollout(state, walk or [])
        return {"correct": walk is not None and status == "ok" and list(end[:2]) == query["after"]
                and len(walk) == query["length"]}
    words = re.findall(r"\b(yes|no)\b", text)
    return {"correct": bool(words) and words[0] == row["answer"]}
