"""The main job's --quick form: every stage, the base's pretraining included, runs through the
project's own scripts and leaves its outputs, and the results table is filled; a re-run skips what
is done and resumes an interrupted OPCD. (Smoke test: the numbers are not judged; tests/test_mini.py
checks the shipped base's answers.)"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_pipeline_runs_every_stage_and_fills_the_table(tmp_path):
    out = tmp_path / "mini"
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "--quick", "--out", str(out)],
                          capture_output=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "2"})
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()  # bytes: a bar's \r stays a \r
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # A quiet console: each stage's command, a bar redrawn in place, its wall time, then the table; the stages'
    # own output is in logs.
    console = proc.stdout + proc.stderr
    stages = proc.stdout.count("\n$ ")
    assert stages >= 20 and console.count("\n") <= 2 * stages + 20, console[-3000:]
    noise = [line for line in console.splitlines() if re.match(r"(INFO|WARNING|\[W|Loading|.*Warning:)", line.strip())]
    assert not noise, noise[:5]
    assert "Loading safetensors" in (out / "logs" / "mgsd.log").read_text()  # the OPCD stage's vLLM engine
    assert "episodes" in (out / "eval" / "logs" / "row2.log").read_text()
    for split in ("train", "val", "test"):
        assert (out / "data" / split / "data.jsonl").stat().st_size > 0
    for model in (out / "base" / "init", out / "base" / "see" / "model", out / "base" / "plan" / "model",
                  out / "psft" / "model", out / "mgsd" / "best"):
        assert (model / "config.json").is_file() and list(model.glob("*.safetensors")), model
    assert (out / "mgsd" / "log.jsonl").read_text().strip()

    results = json.loads((out / "results.json").read_text())
    assert list(results) == ["base", "+ perception SFT", "+ OPCD (MGSD)"]
    test_rows = sum(1 for _ in open(out / "data" / "test" / "data.jsonl"))
    for summary in results.values():
        for condition in ("image", "text"):
            cell = summary["conditions"][condition]
            assert cell["n"] == test_rows // 2  # one planning and one perception row per instance
            assert set(cell["per_task"]) == {"frozenlake", "maze", "minibehaviour"}
            assert 0.0 <= cell["macro"]["success"] <= 1.0
        perception = summary["perception"]["conditions"]["image"]
        assert perception["n"] == test_rows // 2 and 0.0 <= perception["per_task"]["maze"]["player"] <= 1.0
    table = (out / "results.md").read_text().splitlines()
    assert len(table) == 2 + len(results)
    assert all(row.count("|") == table[0].count("|") for row in table)
    assert (out / "results.png").stat().st_size > 1000
    # Stages already done are skipped: a second run reuses everything and rewrites the same table.
    again = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "--quick", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "$ " not in again.stdout
    assert (out / "results.md").read_text().splitlines() == table
    # Other settings in the same run folder would silently reuse its stages: refused, nothing run.
    other = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "--quick", "--out", str(out), "--opcd-steps", "3"],
                           capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and other.stdout == "" and other.stderr.count("\n") == 1
    assert "--opcd-steps 2 -> 3" in other.stderr and json.loads((out / "settings.json").read_text())["opcd_steps"] == 2
    # An OPCD run without done.json was interrupted (best/ exists from its first validation on): it is
    # resumed from last/, not taken as done; here no step is left, so best/ stays as it was.
    assert json.loads((out / "mgsd" / "done.json").read_text())["steps"] == 2
    best = (out / "mgsd" / "best" / "model.safetensors").read_bytes()
    (out / "mgsd" / "done.json").unlink()
    resumed = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "--quick", "--out", str(out)],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("$ ") == 1 and "opcd.py" in resumed.stdout and "--resume" in resumed.stdout
    assert "steps 2->2" in (out / "logs" / "mgsd.log").read_text() and (out / "mgsd" / "done.json").is_file()
    assert (out / "mgsd" / "best" / "model.safetensors").read_bytes() == best


def test_a_base_without_a_model_is_one_error_line_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "pipeline.py"), "--base", str(tmp_path / "empty"), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: no model in ")
    assert not (tmp_path / "run").exists()


def test_the_table_shows_held_out_columns_only_where_every_row_has_them():
    import pipeline

    def summary(image, text, heldout=None):
        cell = lambda s: {"macro": {"success": s, "optimal": s}, "per_task": {t: {"success": s} for t in pipeline.TASKS}}  # noqa: E731
        out = {"conditions": {"image": cell(image), "text": cell(text)},
               "perception": {"conditions": {"image": {"per_task": {"maze": {"player": 1.0, "target": 0.5}}}}}}
        if heldout:
            out["heldout"] = {"conditions": {"image": cell(heldout[0]), "text": cell(heldout[1])}}
        return out

    both = pipeline.results_table({"a": summary(0.25, 0.5, (0.125, 0.375)), "b": summary(0.5, 0.75, (0.0, 1.0))})
    header, _, a, b = both.splitlines()
    assert header.endswith("| position questions | held-out macro img | held-out macro text |")
    assert a == "| a | 25.0 | 25.0 | 25.0 | 25.0 | 25.0 | 50.0 | 25.0 | 75.0 | 12.5 | 37.5 |"
    assert b.endswith("| 75.0 | 0.0 | 100.0 |")
    one = pipeline.results_table({"a": summary(0.25, 0.5, (0.125, 0.375)), "b": summary(0.5, 0.75)}).splitlines()
    assert one[0].endswith("| position questions |") and all(row.count("|") == one[0].count("|") for row in one)
