"""mgsd/benchmarks.py: the paper's VSP and VisualPlanning files, as small fixtures written here in their formats,
import into split folders that the evaluator reads, with every plan length checked."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import envs
import evaluate
from mgsd import benchmarks, pictures, splits

ROOT = Path(__file__).resolve().parents[1]
SYMBOL = {"frozen": "_", "hole": "#", "player": "@", "goal": "*"}


def states(task, level, count, first_seed=0):
    found = (envs.generate(task, level, s) for s in range(first_seed, first_seed + 50 * count))
    return [s for s in found if s is not None][:count]


def vsp_folder(root, level_states):
    """VSP FrozenLake layout: levelN/table/K.txt, levelN/metadata.json, levelN/img/K.png (only for K = 0)."""
    for level, group in level_states.items():
        folder = root / f"level{level}"
        (folder / "table").mkdir(parents=True)
        (folder / "img").mkdir()
        plans = {}
        for k, state in enumerate(group):
            roles = pictures.cell_roles(state)
            lines = ["| | " + " | ".join(f"Col {c + 1}" for c in range(level)) + " |"]
            lines += [f"| Row {r + 1} | " + " | ".join(SYMBOL[roles[(r, c)]] for c in range(level)) + " |"
                      for r in range(level)]
            (folder / "table" / f"{k}.txt").write_text("\n".join(lines) + "\n")
            plans[f"{k}.png"] = "".join(state["plan"])
        pictures.render(group[0], 96).save(folder / "img" / "0.png")  # stands in for the benchmark's own picture
        (folder / "metadata.json").write_text(json.dumps(plans, indent=4))
    return root


def visualplanning_record(state):
    n, task = state["level"], state["task"]
    flat = lambda p: p[0] * n + p[1]
    if task == "frozenlake":
        roles = pictures.cell_roles(state)
        letter = {"frozen": "F", "hole": "H", "player": "S", "goal": "G"}
        meta = {"start_pos": flat(state["start"]), "target_pos": flat(state["goal"]), "level": n,
                "layout": [[letter[roles[(r, c)]] for c in range(n)] for r in range(n)],
                "distance_map": {str(flat(state["start"])): len(state["plan"])}}
        return {"input_state": [flat(state["start"])] * (len(state["plan"]) + 1), "meta": meta}
    if task == "maze":
        layout = [[{side: a not in state["open"][r][c] for side, a in benchmarks.WALLS.items()} for c in range(n)]
                  for r in range(n)]
        meta = {"start_pos": flat(state["start"]), "target_pos": flat(state["target"]), "level": n, "layout": layout,
                "distance_map": {str(flat(state["start"])): len(state["plan"])}}
        return {"input_state": [], "meta": meta}
    meta = {"level": n, "start_pos": state["agent"], "start_dir": 0, "printer_pos": state["printer"],
            "table_pos": state["table"]}
    return {"input_state": [[state["agent"], False]] * (len(state["plan"]) + 1), "meta": meta}


def vp_files(root, groups):
    paths = []
    for task, group in groups.items():
        path = root / f"{task}-test.jsonl"
        path.write_text("".join(json.dumps(visualplanning_record(s)) + "\n" for s in group))
        paths.append(path)
    return paths


def test_vsp_import_rebuilds_each_map_and_keeps_the_benchmarks_own_picture(tmp_path):
    given = {3: states("frozenlake", 3, 3), 4: states("frozenlake", 4, 2)}
    src = vsp_folder(tmp_path / "vsp", given)
    out = benchmarks.write_split(benchmarks.import_vsp(src, draw_missing=True), tmp_path / "split")
    rows = splits.load_split(out)
    assert [r["id"] for r in rows] == ["vsp-frozenlake-3-0", "vsp-frozenlake-3-1", "vsp-frozenlake-3-2",
                                       "vsp-frozenlake-4-0", "vsp-frozenlake-4-1"]
    for row, state in zip(rows, given[3] + given[4]):
        assert {k: row["state"][k] for k in ("start", "goal", "holes", "plan")} == \
            {k: state[k] if k != "holes" else sorted(state[k]) for k in ("start", "goal", "holes", "plan")}
    assert Path(rows[0]["image"]).read_bytes() == (src / "level3" / "img" / "0.png").read_bytes()
    assert Path(rows[1]["image"]).stat().st_size > 0  # drawn: the fixture has no picture for it


def test_vsp_import_stops_on_a_missing_picture_or_a_wrong_plan_length(tmp_path):
    src = vsp_folder(tmp_path / "vsp", {3: states("frozenlake", 3, 2)})
    with pytest.raises(benchmarks.BenchmarkError, match=r"level3/img/1\.png: picture not found"):
        benchmarks.import_vsp(src)
    meta = json.loads((src / "level3" / "metadata.json").read_text())
    meta["1.png"] += "R"
    (src / "level3" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(benchmarks.BenchmarkError, match=r"table/1\.txt: our shortest plan has \d+ actions, the benchmark"):
        benchmarks.import_vsp(src, draw_missing=True)


def test_visualplanning_import_round_trips_all_three_tasks(tmp_path):
    given = {"frozenlake": states("frozenlake", 4, 3), "maze": states("maze", 3, 3), "minibehaviour": states("minibehaviour", 5, 3)}
    items = benchmarks.import_visualplanning(vp_files(tmp_path, given))
    assert [s["task"] for s, *_ in items] == ["frozenlake"] * 3 + ["maze"] * 3 + ["minibehaviour"] * 3
    for (state, *_), want in zip(items, given["frozenlake"] + given["maze"] + given["minibehaviour"]):
        keys = {"frozenlake": ("start", "goal", "holes", "plan"), "maze": ("start", "target", "open", "plan"),
                "minibehaviour": ("agent", "printer", "table", "plan")}[want["task"]]
        assert {k: state[k] for k in keys} == {k: sorted(want[k]) if k in ("holes", "table") else want[k] for k in keys}


def test_visualplanning_mismatch_is_one_error_naming_the_row(tmp_path):
    records = [visualplanning_record(s) for s in states("maze", 3, 3)]
    records[1]["meta"]["distance_map"] = {str(records[1]["meta"]["start_pos"]): 99}
    path = tmp_path / "maze-test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = subprocess.run([sys.executable, "-m", "mgsd.benchmarks", "visualplanning", str(path), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert f"{path}:2: our shortest plan has" in proc.stderr and "benchmark says 99" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_level_too_large_for_the_cell_size_is_one_error_and_writes_nothing(tmp_path):
    path = vp_files(tmp_path, {"frozenlake": states("frozenlake", 4, 1) + states("frozenlake", 6, 1)})[0]
    proc = subprocess.run([sys.executable, "-m", "mgsd.benchmarks", "visualplanning", str(path), "--out",
                           str(tmp_path / "out"), "--image-size", "160", "--cell-size", "32"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "level 6 does not fit 32-px cells into 160 px" in proc.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_oracle_scores_100_percent_and_the_hf_backend_runs_on_imported_benchmarks(tmp_path, tiny_model):
    given = {"frozenlake": states("frozenlake", 3, 2), "maze": states("maze", 3, 2), "minibehaviour": states("minibehaviour", 5, 2)}
    out = tmp_path / "vp"
    proc = subprocess.run([sys.executable, "-m", "mgsd.benchmarks", "visualplanning", *map(str, vp_files(tmp_path, given)),
                           "--out", str(out), "--image-size", "128"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "6 instances" in proc.stdout
    summary = evaluate.main(["--model", "oracle", "--data", str(out), "--backend", "oracle", "--condition", "both",
                             "--out", str(tmp_path / "oracle")])
    for condition in ("image", "text"):
        assert summary["conditions"][condition]["macro"]["success"] == summary["conditions"][condition]["macro"]["optimal"] == 1.0
    summary = evaluate.main(["--model", tiny_model, "--data", str(out), "--backend", "hf", "--max-new-tokens", "8",
                             "--out", str(tmp_path / "hf")])
    assert summary["conditions"]["image"]["n"] == 6 and summary["conditions"]["image"]["errors"] == 0


def test_an_import_whose_split_would_not_load_writes_nothing(tmp_path):
    """A benchmark picture that is a PNG only by its name (a JPEG renamed, a truncated file): the importer used to
    write a split that evaluate.py then refused; it reads its own output back first."""
    src = vsp_folder(tmp_path / "vsp", {3: states("frozenlake", 3, 2)})
    picture = src / "level3" / "img" / "0.png"
    picture.write_bytes(picture.read_bytes()[:40])
    with pytest.raises(benchmarks.BenchmarkError, match=r"would not load: .*vsp-frozenlake-3-0\.png cannot be decoded"):
        benchmarks.write_split(benchmarks.import_vsp(src, draw_missing=True), tmp_path / "split")
    assert not (tmp_path / "split").exists() and not list(tmp_path.glob(".split.tmp-*"))
