"""The episode gallery (mgsd/gallery.py): every tile's path ends where the scorer's simulator stops and its mark
says what the scorer scored, on all three tasks and both conditions; evaluate.py writes it; envs.py show draws a
given plan the same way."""
import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

import envs
import evaluate
from mgsd import gallery, splits

ROOT = Path(__file__).resolve().parents[1]


def answer(plan, task):
    return f"<answer>{envs.plan_text(plan, task)}</answer>"


def responses(state):
    """Responses that make every outcome this instance allows: shortest, longer, illegal, into a hole, short,
    unparsed."""
    task, plan, world = state["task"], state["plan"], envs.World(state)
    out = [answer(plan, task), "I cannot tell."]
    out.append(answer(plan + [envs.ACTIONS[task][0]], task))  # succeeds, then one action too many: longer
    illegal = next((a for a in envs.ACTIONS[task] if world.step(world.start, a)[1] == "illegal"), None)
    if illegal:
        out.append(answer([illegal], task))
    fall = envs.solve(state, done=lambda sim, status: status == "fell")
    if fall:
        out.append(answer(fall, task))
    if len(plan) > 1:
        out.append(answer(plan[:-1], task))
    return out


def test_every_tile_ends_where_the_scorer_stops_and_marks_what_it_scored(make_data, tmp_path):
    rows = splits.load_split(make_data("test", 2, kinds=("planning",)), kinds=["planning"])
    assert {r["task"] for r in rows} == set(envs.TASKS)
    records = []
    for row in rows:
        for condition in ("image", "text"):
            for i, text in enumerate(responses(row["state"])):
                record = evaluate.score_episode({"row": row, "condition": condition}, text, None)
                records.append({**record, "id": row["id"]})
    marks_seen = set()
    drawn = evaluate.write_gallery(rows, records, tmp_path / "gallery.png", "every outcome", per_group=10 ** 6)
    assert len(drawn) == len(records)
    by_key = {}
    for record in records:
        by_key.setdefault((record["id"], record["condition"]), []).append(record)
    for (id_, condition, last, mark), record in zip(drawn, [r for g in gallery.groups(rows, records, 10 ** 6).values()
                                                            for _, r in g]):
        assert (id_, condition) == (record["id"], record["condition"])
        state = next(r["state"] for r in rows if r["id"] == id_)
        m = record["metrics"]
        assert mark in ("optimal", "success") if m["success"] else mark not in ("optimal", "success")
        assert (mark == "optimal") == m["optimal"] and (mark == "illegal") == m["illegal"]
        assert (mark == "unparsed") == (not m["parse_ok"])
        if record["plan"] is not None:
            final, status, _ = envs.rollout(state, record["plan"])
            assert last == tuple(final[:2]) and (mark == "fell") == (status == "fell")
        marks_seen.add(mark)
    assert marks_seen == set(gallery.MARKS)  # every mark was drawn at least once
    picture = Image.open(tmp_path / "gallery.png")
    assert picture.width >= gallery.LABEL + gallery.TILE and picture.height >= 6 * gallery.TILE  # 3 tasks x 2


def test_the_sample_puts_failures_first_and_is_the_same_every_time(make_data):
    rows = splits.load_split(make_data("test", 2, kinds=("planning",)), kinds=["planning"])
    records = [evaluate.score_episode({"row": r, "condition": "image"}, text, None)
               for r in rows for text in responses(r["state"])[:2]]  # a success and a parse failure each
    chosen = gallery.groups(rows, records, per_group=3)
    assert chosen == gallery.groups(rows, records, per_group=3)
    for pairs in chosen.values():
        success = [p[1]["metrics"]["success"] for p in pairs]
        assert success == sorted(success) and not success[0]  # failures, then successes


def test_evaluate_writes_the_gallery_of_its_run(make_data, tmp_path):
    data = make_data("test", 2, kinds=("planning",))
    evaluate.main(["--model", "oracle", "--backend", "oracle", "--data", data, "--condition", "both", "--out",
                   str(tmp_path / "eval")])
    picture = Image.open(tmp_path / "eval" / "gallery.png")
    assert picture.format == "PNG" and picture.height >= 6 * gallery.TILE
    episodes = [json.loads(x) for x in (tmp_path / "eval" / "episodes.jsonl").read_text().splitlines()]
    assert all(e["metrics"]["success"] for e in episodes)  # the oracle: every tile marked a success


def test_envs_show_draws_a_given_plan_over_the_instance(tmp_path):
    out = tmp_path / "shown.png"
    result = subprocess.run([sys.executable, "envs.py", "show", "maze", "--level", "3", "--seed", "1", "--out", str(out),
                             "--plan", "U,U"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "plan drawn" in result.stdout and Image.open(out).size == (gallery.TILE, gallery.TILE + gallery.CAPTION)


def test_the_pipelines_sheet_shows_stage_1_and_mgsd_on_the_same_instances(make_data, tmp_path):
    """Two evaluations of the same split (the oracle, and a model that answers nothing): the right side's sample
    (failures first) picks the instances, the left side draws the same ones."""
    data = make_data("test", 2, kinds=("planning",))
    evaluate.main(["--model", "oracle", "--backend", "oracle", "--data", data, "--condition", "both", "--out",
                   str(tmp_path / "oracle")])
    silent = tmp_path / "silent"
    silent.mkdir()
    records = [json.loads(x) for x in (tmp_path / "oracle" / "episodes.jsonl").read_text().splitlines()]
    rows = {r["id"]: r for r in splits.load_split(data, kinds=["planning"])}
    (silent / "episodes.jsonl").write_text("".join(
        json.dumps(evaluate.score_episode({"row": rows[r["id"]], "condition": r["condition"]}, "no idea", None)) + "\n"
        for r in records))
    left, right = gallery.compare(list(rows.values()), records, [json.loads(x) for x in
                                  (silent / "episodes.jsonl").read_text().splitlines()], tmp_path / "gallery.png")
    assert [(i, c) for i, c, _, _ in left] == [(i, c) for i, c, _, _ in right] and len(left) == 3 * 2 * 3
    assert {m for *_, m in right} == {"unparsed"} and {m for *_, m in left} == {"optimal"}
    assert Image.open(tmp_path / "gallery.png").width > 2 * gallery.LABEL + 6 * gallery.TILE
