"""How often a planning answer states the picture's positions (and MiniBehaviour's table) right: the state
line that the student writes before its route ("Map 4x4. Player at (r, c), goal at ...") scored against the
true state.

Perception QA after stage 1 asks for positions in its own format; this reads them out of the planning
answers, image condition, of an evaluate.py run (its episodes.jsonl and run.json, which names the split).

    python results/mini/in_plan_perception.py runs/mini-s0/eval/row1 runs/mini-s0/eval/row2
"""
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import envs  # noqa: E402
from mgsd import splits  # noqa: E402

# (task, state key, how the answer names it)
POSITIONS = (("frozenlake", "start", "Player"), ("frozenlake", "goal", "goal"), ("maze", "start", "Player"),
             ("maze", "target", "target"), ("minibehaviour", "agent", "Agent"), ("minibehaviour", "printer", "printer"))


def in_plan_accuracy(run_dir):
    run_dir = Path(run_dir)
    split = Path(json.loads((run_dir / "run.json").read_text())["data"])
    states = {row["id"]: row["state"] for row in splits.load_split(split, kinds=["planning"])}
    hits = {}
    for line in open(run_dir / "episodes.jsonl"):
        ep = json.loads(line)
        if ep["condition"] != "image" or ep["kind"] != "planning":
            continue
        for task, key, word in POSITIONS:
            if ep["task"] == task:
                m = re.search(word + " at " + envs.POS_RE.pattern, ep["response"] or "", re.IGNORECASE)
                right = m is not None and [int(m.group(1)), int(m.group(2))] == list(states[ep["id"]][key])
                hits.setdefault(f"{task} {key}", []).append(right)
        if ep["task"] == "minibehaviour":  # the table's six cells, as a set
            m = re.search(r"Table cells: ([^\n]*)", ep["response"] or "")
            cells = sorted([int(r), int(c)] for r, c in envs.POS_RE.findall(m.group(1))) if m else None
            hits.setdefault("minibehaviour table", []).append(cells == sorted(states[ep["id"]]["table"]))
    return {name: 100 * sum(v) / len(v) for name, v in hits.items()}


if __name__ == "__main__":
    results = {run: in_plan_accuracy(run) for run in sys.argv[1:]}
    names = list(next(iter(results.values())))
    print("| run | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for run, acc in results.items():
        print(f"| {run} | " + " | ".join(f"{acc[n]:.1f}" for n in names) + " |")
