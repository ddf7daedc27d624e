"""Bad input, reused folders and interrupted runs, across every script: one line on stderr naming the
problem, exit code 2, and the output folder exactly as it was. The catalogue runs in-process (most
cases fail at parse time and load no model)."""
import json
import shutil
from pathlib import Path

import pytest

import evaluate
import merge
import opcd
import pipeline
import sft
from mgsd import benchmarks, cli, common, splits, tiny

NUMBERS = {"positive": ["0", "-4", "x", "nan", "inf"], "nonneg": ["-1", "nan", "x"], "fraction": ["1.5", "-0.1", "nan"]}
SFT_NUMBERS = {"--batch-size": "positive", "--micro-batch-size": "positive", "--lora-rank": "positive",
               "--max-length": "positive", "--max-new-tokens": "positive", "--val-size": "positive",
               "--lr": "positive", "--epochs": "positive", "--lora-alpha": "positive", "--warmup-ratio": "nonneg",
               "--weight-decay": "nonneg", "--max-grad-norm": "nonneg", "--lora-dropout": "nonneg",
               "--val-every": "nonneg", "--save-every": "nonneg", "--max-steps": "nonneg", "--checkpoint-share": "fraction",
               "--loss-chunk": "positive", "--loader-workers": "nonneg"}
OPCD_NUMBERS = {"--batch-size": "positive", "--micro-batch-size": "positive", "--max-new-tokens": "positive",
                "--kl-chunk": "positive", "--val-every": "positive", "--updates-per-batch": "positive",
                "--max-model-len": "positive", "--lr": "positive", "--temperature": "positive", "--top-p": "positive",
                "--val-temperature": "positive", "--epochs": "positive", "--max-steps": "nonneg",
                "--reward-coef": "nonneg", "--weight-decay": "nonneg", "--max-grad-norm": "nonneg", "--topk": "positive",
                "--teacher-retries": "nonneg"}
EVAL_NUMBERS = {"--limit": "positive", "--max-new-tokens": "positive", "--batch-size": "positive",
                "--concurrency": "positive", "--timeout-seconds": "positive", "--retries": "nonneg",
                "--backoff-seconds": "nonneg", "--max-error-share": "nonneg"}


def number_cases(script, table):
    return [(script, [flag, value], flag) for flag, kind in table.items() for value in NUMBERS[kind][:4 if kind == "positive" else 3]]


# (script, extra arguments, text the error line must contain). Base arguments are added per script;
# {model}, {data}, {out}, {bad:...} are filled in by the fixture.
CASES = (
    number_cases("sft", SFT_NUMBERS) + number_cases("opcd", OPCD_NUMBERS) + number_cases("evaluate", EVAL_NUMBERS) + [
        ("sft", ["--train-vision"], "--train-vision needs --full"),
        ("sft", ["--kinds", "nonsense"], "no rows with messages of kinds ['nonsense']"),
        ("sft", ["--data", "{tmp}/nowhere"], "nowhere"),
        ("sft", ["--out", "{run}"], "already holds a run"),
        ("sft", ["--out", "{file}"], "is a file"),
        ("sft", ["--out", "{file}/sub"], "cannot write into"),
        ("sft", ["--resume"], "--resume: no checkpoint"),
        ("sft", ["--batch-size", "100000"], "at most the"),
        ("sft", ["--model", "{tmp}/no-model"], "no-model"),
        ("sft", ["--model", "Qwen/Qwen3-VL-4B-Instruct"], "not in the Hugging Face cache"),
        ("evaluate", ["--model", "Qwen/Qwen3-VL-4B-Instruct", "--backend", "hf"], "not in the Hugging Face cache"),
        ("sft", ["--model", "{no_tokenizer}"], "no tokenizer files"),
        ("sft", ["--model", "{truncated}"], "cannot load the weights"),
        ("sft", ["--model", "{missing_tensor}"], "1 missing weight(s) in the checkpoint"),
        ("evaluate", ["--model", "{missing_tensor}", "--backend", "hf"], "1 missing weight(s) in the checkpoint"),
        ("sft", ["--data", "{bad:messages_string}"], "messages must be a list"),
        ("sft", ["--data", "{bad:content_int}"], "message content must be a string or a list, got int"),
        ("sft", ["--data", "{bad:no_assistant}"], "no assistant turn"),
        ("sft", ["--data", "{bad:state_missing}"], "state misses holes"),
        ("sft", ["--data", "{bad:level_string}"], "level must be an integer, got '3'"),
        ("sft", ["--data", "{bad:unknown_task}"], "'sokoban'"),
        ("sft", ["--data", "{bad:image_item}"], "message item must be"),
        ("sft", ["--data", "{bad:not_json}"], "malformed JSON"),
        ("sft", ["--data", "{bad:not_object}"], "a row must be a JSON object"),
        ("sft", ["--data", "{bad:plan_string}"], "plan must be a list"),
        ("sft", ["--val-data", "{bad:no_assistant}"], "no assistant turn"),
        ("sft", ["--data", "{bad:plan_not_shortest}"], "the shortest has"),
        ("sft", ["--data", "{bad:plan_misses_goal}"], "does not reach the goal"),
        ("sft", ["--data", "{bad:start_off_grid}"], "is not a cell of the 3x3 grid"),
        ("sft", ["--data", "{bad:hole_off_grid}"], "must be a list of cells"),
        ("sft", ["--data", "{bad:holes_number}"], "must be a list of cells"),
        ("sft", ["--data", "{bad:no_plan}"], "row misses plan"),
        ("sft", ["--data", "{bad:image_number}"], "image must be a path"),
        ("sft", ["--data", "{bad:id_list}"], "id must be a string or an integer"),
        ("sft", ["--data", "{bad:id_shared}"], "two different instances"),
        ("sft", ["--data", "{bad:row_twice}"], "a second perception row"),
        ("opcd", ["--data", "{bad:plan_not_shortest}"], "the shortest has"),
        ("evaluate", ["--data", "{bad:plan_misses_goal}"], "does not reach the goal"),
        ("evaluate", ["--data", "{bad:id_shared}"], "two different instances"),
        ("sft", ["--data", "{bad:image_outside}"], "lies outside the split folder"),
        ("sft", ["--data", "{bad:image_absolute}"], "lies outside the split folder"),
        ("sft", ["--data", "{bad:image_not_png}"], "is not a PNG file"),
        ("opcd", ["--data", "{bad:image_outside}"], "lies outside the split folder"),
        ("evaluate", ["--data", "{bad:image_outside}"], "lies outside the split folder"),
        ("evaluate", ["--data", "{bad:image_not_png}"], "is not a PNG file"),
        ("opcd", ["--teacher", "{tmp}/no-teacher"], "no-teacher"),
        ("opcd", ["--loss", "full", "--reward-coef", "0.5"], "need --loss sampled"),
        ("opcd", ["--fsdp", "--loss", "full"], "--fsdp supports neither"),
        ("opcd", ["--out", "{run}"], "already holds a run"),
        ("opcd", ["--resume"], "--resume: no"),
        ("opcd", ["--data", "{tmp}/nowhere"], "nowhere"),
        ("opcd", ["--batch-size", "100000"], "fewer than --batch-size"),
        ("opcd", ["--loss", "exact"], "invalid choice: 'exact'"),
        ("opcd", ["--data", "{bad:state_missing}"], "state misses holes"),
        ("opcd", ["--out", "{file}/sub"], "cannot write into"),
        ("evaluate", ["--api-key-env", "sk-secret-123"], "must name an environment variable"),
        ("evaluate", ["--backend", "openai", "--base-url", "http://user:sk-secret-123@127.0.0.1:1/v1"],
         "must not carry credentials"),
        ("evaluate", ["--backend", "openai", "--base-url", "http://127.0.0.1:1/v1?api_key=sk-secret-123"],
         "must not carry credentials"),
        ("evaluate", ["--backend", "openai", "--base-url", "file:///etc/passwd"], "must be an http"),
        ("evaluate", ["--backend", "openai"], "needs --base-url"),
        ("evaluate", ["--condition", "text", "--kind", "perception"], "applies to planning only"),
        ("evaluate", ["--data", "{tmp}/nowhere"], "nowhere"),
        ("evaluate", ["--out", "{run}"], "already holds a run"),
        ("evaluate", ["--data", "{bad:unknown_task}"], "'sokoban'"),
        ("evaluate", ["--backend", "tgi"], "invalid choice: 'tgi'"),
        ("merge", ["--out", "{model}"], "is the input"),
        ("merge", ["--out", "{model}", "--overwrite"], "is the input"),
        ("evaluate", ["--out", "{data}", "--overwrite"], "is the input"),
        ("evaluate", ["--out", "{data}/..", "--overwrite"], "contains the input"),
        ("evaluate", ["--out", "{run}", "--resume"], "does not hold a run of evaluate.py"),
        ("sft", ["--out", "{model}", "--overwrite"], "is the input"),
        ("sft", ["--out", "{data}", "--overwrite"], "is the input"),
        ("sft", ["--out", "{data}/inner", "--overwrite"], "lies inside the input"),
        ("sft", ["--out", "{run}", "--overwrite"], "does not hold a run of sft.py"),
        ("opcd", ["--out", "{data}", "--overwrite"], "is the input"),
        ("opcd", ["--out", "{run}", "--overwrite"], "does not hold a run of opcd.py"),
        ("pipeline", ["--out", "{model}"], "holds a model"),
        ("merge", ["--out", "{run}"], "already holds a run"),
        ("merge", ["--tolerance", "0"], "--tolerance"),
        ("merge", ["--adapter", "{tmp}/no-adapter"], "not a LoRA adapter"),
        ("envs", ["data", "--out", "{out}", "--split", "train", "--per-level", "0"], "at least 1"),
        ("envs", ["data", "--out", "{out}", "--split", "train", "--per-level", "1", "--tasks", "sokoban"], "'sokoban'"),
        ("envs", ["data", "--out", "{out}", "--split", "dev", "--per-level", "1"], "'dev'"),
        ("envs", ["data", "--out", "{data}", "--split", "test", "--per-level", "1"], "already holds a split"),
        ("envs", ["data", "--out", "{out}", "--split", "train", "--per-level", "1", "--levels", "maze=6",
                  "--image-size", "160", "--cell-size", "32"], "does not fit"),
        ("envs", ["show", "maze", "--level", "3", "--seed", "1", "--out", "{tmp}/view.txt"], "cannot write the picture"),
        ("envs", ["show", "maze", "--level", "3", "--seed", "1", "--out", "{tmp}/nowhere/view.png"],
         "cannot write the picture"),
        ("tiny", ["grids", "--out", "{out}", "--split", "train", "--count", "0"], "at least 1"),
        ("tiny", ["grids", "--out", "{run}", "--split", "train", "--count", "1"], "exists"),
        ("tiny", ["model", "--out", "{run}"], "exists"),
        ("tiny", ["model", "--out", "{file}"], "exists"),
        ("sft", ["--seed", "-1"], "--seed"),
        ("opcd", ["--seed", "-1"], "--seed"),
        ("pipeline", ["--out", "{out}", "--seed", "-1"], "--seed"),
        ("tiny", ["model", "--out", "{out}", "--seed", "-1"], "--seed"),
        ("pipeline", ["--out", "{file}"], "is a file"),
        ("pipeline", ["--out", "{out}", "--levels", "frozenlake=x"], "--levels"),
        ("pipeline", ["--out", "{out}", "--levels", "maze=30"], "out of range"),
        ("pipeline", ["--out", "{out}", "--levels", "frozenlake=3 maze=3"], "does not fit"),
        ("pipeline", ["--aggregate", "{tmp}/nowhere"], "no results.json"),
        ("pipeline", ["--aggregate", "{tmp}/agg-a", "{tmp}/agg-b"], "--opcd-steps 40 -> 2"),
        ("pipeline", ["--out", "{out}", "--base", "{tmp}"], "no model in"),
        ("opcd", ["--top-p", "5"], "--top-p"),
        ("evaluate", ["--backend", "openai", "--base-url", "ftp://127.0.0.1/v1"], "must be an http"),
        ("evaluate", ["--backend", "openai", "--base-url", "localhost:8000/v1"], "must be an http"),
        ("evaluate", ["--model", "{model}", "--backend", "hf", "--out", "{model}", "--overwrite"], "is the input"),
        ("merge", ["--probe-data", "{data}", "--out", "{data}"], "is the input"),
        ("opcd", ["--out", "{model}", "--overwrite"], "is the input"),
        ("opcd", ["--out", "{data}/inside"], "lies inside the input"),
        ("sft", ["--val-data", "{data}", "--out", "{data}", "--overwrite"], "is the input"),
        ("sft", ["--data", "{data}", "{data}"], "appears twice across the folders"),
        ("opcd", ["--teacher-url", "http://127.0.0.1:1/v1", "--loss", "full"], "--teacher-url"),
        ("opcd", ["--teacher-url", "http://127.0.0.1:1/v1", "--temperature", "0.7"], "--temperature 1"),
        ("opcd", ["--teacher-url", "http://127.0.0.1:1/v1", "--teacher", "live"], "a named --teacher"),
        ("opcd", ["--teacher-url", "http://127.0.0.1:1/v1", "--teacher-retries", "0"], "cannot reach"),
        ("opcd", ["--loss", "topk", "--fsdp"], "--fsdp supports neither"),
        ("opcd", ["--loss", "topk", "--reward-coef", "0.5"], "need --loss sampled"),
        ("opcd", ["--max-new-tokens", "1000000000000"], "exceeds the model's context"),
        ("evaluate", ["--model", "{model}", "--backend", "hf", "--max-new-tokens", "1000000000000"],
         "exceeds the model's context"),
        ("opcd", ["--val-top-p", "0"], "--val-top-p"),
        ("opcd", ["--betas", "2", "2"], "--betas"),
        ("opcd", ["--betas", "0.9", "1"], "--betas"),
        ("opcd", ["--epochs", "1e308"], "--epochs"),
        ("sft", ["--epochs", "1e308"], "--epochs"),
        ("opcd", ["--lora-rank", "1000000000"], "--lora-rank"),
        ("sft", ["--lora-rank", "1000000000"], "--lora-rank"),
        ("sft", ["--kinds", "perception,perception"], "distinct comma-separated"),
        ("sft", ["--kinds", ","], "distinct comma-separated"),
        ("tiny", ["model", "--out", "{out}", "--image-size", "0"], "positive multiple of 32"),
        ("tiny", ["model", "--out", "{out}", "--image-size", "-32"], "positive multiple of 32"),
        ("envs", ["data", "--out", "{out}", "--split", "train", "--per-level", "1", "--levels", "frozenlake=3,3"], "twice"),
        ("envs", ["data", "--out", "{out}", "--split", "train", "--per-level", "1", "--levels", "frozenlake=3",
                  "frozenlake=4"], "twice"),
        ("envs", ["data", "--out", "{out}", "--split", "train", "--per-level", "1", "--tasks", "frozenlake", "frozenlake"],
         "named twice"),
        ("envs", ["data", "--out", "{out}", "--split", "train", "--per-level", "1", "--kinds", "planning,planning"],
         "distinct comma-separated"),
        ("envs", ["data", "--out", "{out}", "--split", "train", "--per-level", "1", "--kinds", ","], "distinct comma-separated"),
        ("envs", ["data", "--out", "{out}", "--split", "train", "--per-level", "1", "--levels", "maze=3", "--tasks",
                  "frozenlake"], "which --tasks leaves out"),
        ("benchmarks", ["vsp", "{tmp}/nowhere", "--out", "{out}"], "no levelN folders"),
        ("benchmarks", ["visualplanning", "{tmp}/nowhere.jsonl", "--out", "{out}"], "unreadable"),
    ])

def _state(row, **changes):
    """The row's on-disk state (a JSON string) with `changes`."""
    return json.dumps({**json.loads(row["state"]), **changes})


BAD_ROWS = {
    "messages_string": lambda r: r.update(messages="hello"),
    "content_int": lambda r: r["messages"][0].update(content=7),
    "no_assistant": lambda r: r.update(messages=r["messages"][:-1]),
    "state_missing": lambda r: r.update(state=json.dumps({k: v for k, v in json.loads(r["state"]).items() if k != "holes"})),
    "level_string": lambda r: r.update(level="3"),
    "unknown_task": lambda r: r.update(task="sokoban"),
    "image_item": lambda r: r["messages"][0]["content"].append({"type": "image", "image": 5}),
    "plan_string": lambda r: r.update(plan="RRD"),
    "plan_not_shortest": lambda r: r.update(plan=r["plan"] + ["U", "D"]),
    "plan_misses_goal": lambda r: r.update(plan=r["plan"][:-1]),
    "start_off_grid": lambda r: r.update(state=_state(r, start=[0, 9])),
    "hole_off_grid": lambda r: r.update(state=_state(r, holes=[[7, 7]])),
    "holes_number": lambda r: r.update(state=_state(r, holes=5)),
    "no_plan": lambda r: r.pop("plan"),
    "image_number": lambda r: r.update(image=5),
    "id_list": lambda r: r.update(id=[1, 2]),
    "image_outside": lambda r: r.update(image="../../../../etc/passwd"),
    "image_absolute": lambda r: r.update(image="/etc/hostname"),
    "image_not_png": lambda r: r.update(image="data.jsonl"),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, make_data):
    """A tiny model, good data, a folder holding a finished-looking run, broken copies of model and data."""
    root = tmp_path_factory.mktemp("catalogue")
    data = Path(make_data("train", 6, tasks=["frozenlake"], levels=[3], kinds=("perception", "planning")))
    run = root / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1}\n')
    (root / "a-file").write_text("x")
    for name, steps in (("agg-a", 40), ("agg-b", 2)):  # two finished-looking main jobs made with other settings
        (root / name).mkdir()
        (root / name / "results.json").write_text("{}")
        (root / name / "settings.json").write_text(json.dumps({"seed": len(name), "opcd_steps": steps}))
    no_tok = root / "no-tokenizer"
    shutil.copytree(tiny_model, no_tok)
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        (no_tok / name).unlink(missing_ok=True)
    truncated = root / "truncated"
    shutil.copytree(tiny_model, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    missing_tensor = root / "missing-tensor"
    shutil.copytree(tiny_model, missing_tensor)
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(missing_tensor / "model.safetensors"))
    del tensors[sorted(k for k in tensors if "layers.0.mlp.up_proj" in k)[0]]
    save_file(tensors, str(missing_tensor / "model.safetensors"), metadata={"format": "pt"})
    lines = (data / "data.jsonl").read_text().splitlines()
    bad = {}
    last = {json.loads(line)["kind"]: json.loads(line)["id"] for line in lines}  # the last instance's id of each kind
    edits = {**BAD_ROWS, "id_shared": lambda r: r.update(id=last[r["kind"]])}
    for name, edit in list(edits.items()) + [("not_json", None), ("not_object", None)]:
        folder = root / f"bad-{name}"
        shutil.copytree(data, folder)
        broken = []
        for line in lines[1:3]:  # a planning and a perception row: every script meets one
            if edit is None:
                broken.append(line[:40] if name == "not_json" else "[1, 2]")
            else:
                row = json.loads(line)
                edit(row)
                broken.append(json.dumps(row))
        (folder / "data.jsonl").write_text("\n".join(lines[:1] + broken + lines[3:]) + "\n")
        bad[name] = folder
    bad["row_twice"] = root / "bad-row_twice"  # one perception row written twice
    shutil.copytree(data, bad["row_twice"])
    (bad["row_twice"] / "data.jsonl").write_text("\n".join(lines[:3] + lines[2:]) + "\n")
    return {"tmp": root, "model": tiny_model, "data": data, "run": run, "file": root / "a-file", "no_tokenizer": no_tok,
            "truncated": truncated, "missing_tensor": missing_tensor, "bad": bad}


SCRIPTS = {"sft": sft.main, "opcd": opcd.main, "evaluate": evaluate.main, "merge": merge.main, "envs": splits.main,
           "tiny": tiny.main, "benchmarks": benchmarks.main, "pipeline": pipeline.main}


def base_args(script, w, out):
    return {"sft": ["--model", w["model"], "--data", w["data"], "--out", out, "--batch-size", 4, "--micro-batch-size", 4,
                    "--max-steps", 1],
            "opcd": ["--model", w["model"], "--teacher", w["model"], "--data", w["data"], "--out", out, "--rollout", "hf",
                     "--batch-size", 2, "--max-steps", 1],
            "evaluate": ["--model", "oracle", "--backend", "oracle", "--data", w["data"], "--out", out],
            "merge": ["--base", w["model"], "--adapter", w["tmp"] / "no-adapter", "--out", out],
            }.get(script, [])


def fill(arg, w, out):
    arg = str(arg)
    if arg.startswith("{bad:"):
        return str(w["bad"][arg[5:-1]])
    return arg.format(tmp=w["tmp"], model=w["model"], data=w["data"], run=w["run"], file=w["file"], out=out,
                      no_tokenizer=w["no_tokenizer"], truncated=w["truncated"], missing_tensor=w["missing_tensor"])


def snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*")}


def test_the_catalogue_has_over_a_hundred_cases():
    assert len(CASES) >= 100 and {script for script, _, _ in CASES} == set(SCRIPTS)


@pytest.mark.parametrize("script, extra, expected", CASES, ids=[f"{s}:{' '.join(e)}" for s, e, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(script, extra, expected, world, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [fill(a, world, out) for a in base_args(script, world, out)]
    extra = [fill(a, world, out) for a in extra]
    for i in range(0, len(extra)):  # a flag given in extra replaces the base value
        if extra[i].startswith("--") and extra[i] in argv:
            j = argv.index(extra[i])
            takes_value = j + 1 < len(argv) and not argv[j + 1].startswith("--")
            del argv[j:j + 1 + takes_value]
    before = snapshot(world["tmp"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script](argv + extra)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert expected in err, err
    assert "sk-secret-123" not in err
    assert not out.exists() and snapshot(world["tmp"]) == before


def test_help_of_every_script_shows_the_defaults(capsys):
    for main, flag in ((sft.main, "--lr LR               peak learning rate (default: 0.0001)"),
                       (opcd.main, "(default: vllm)"), (evaluate.main, "(default: 4096)")):
        with pytest.raises(SystemExit):
            main(["--help"])
        assert flag in capsys.readouterr().out


def test_resume_refuses_other_settings_and_names_them(tiny_model, world, tmp_path, capsys):
    args = ["--model", tiny_model, "--data", world["data"], "--out", tmp_path / "run", "--batch-size", 4,
            "--micro-batch-size", 4, "--full", "--lr", "1e-3", "--epochs", 3]
    sft.main(args + ["--max-steps", 1])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        sft.main(args[:-4] + ["--epochs", 5, "--lr", "2e-3", "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "--lr 0.001 -> 0.002" in err and "--epochs 3.0 -> 5.0" in err
    sft.main(args + ["--max-steps", 2, "--resume"])  # --max-steps is safe to change
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    moved = [str(world["data"]) + "/" if a == world["data"] else a for a in args]  # the same folder, with a slash
    sft.main(moved + ["--max-steps", 3, "--resume"])
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_a_kill_between_the_two_renames_of_a_checkpoint_is_recovered(tiny_model, world, tmp_path):
    """atomic_dir moves the old checkpoint aside, then the new one in; killed in between, only
    .checkpoint.old-PID is left. --resume puts it back and continues; stale temporaries are removed."""
    args = ["--model", tiny_model, "--data", world["data"], "--out", tmp_path / "run", "--batch-size", 4,
            "--micro-batch-size", 4, "--full", "--epochs", 3]
    sft.main(args + ["--max-steps", 1])
    run = tmp_path / "run"
    (run / "checkpoint").rename(run / ".checkpoint.old-4242")
    (run / ".checkpoint.tmp-4243").mkdir()  # a half-written newer one
    sft.main(args + ["--max-steps", 2, "--resume"])
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 2
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []


def test_the_final_checkpoint_is_written_before_the_final_validation(tiny_model, world, tmp_path, monkeypatch):
    """A crash in the final validation used to lose the whole run (the only checkpoint came after it)."""
    def crash(*args, **kwargs):
        raise RuntimeError("validation crashed")

    monkeypatch.setattr(sft, "validate", crash)
    with pytest.raises(RuntimeError, match="validation crashed"):
        sft.main(["--model", tiny_model, "--data", world["data"], "--val-data", world["data"], "--out", tmp_path / "run",
                  "--batch-size", 4, "--micro-batch-size", 4, "--full", "--max-steps", 2])
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 2


def test_check_out_accepts_an_empty_or_missing_folder_and_refuses_a_run(tmp_path):
    cli.check_out(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    cli.check_out(tmp_path / "empty")
    run = tmp_path / "empty"
    (run / "log.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit):
        cli.check_out(run)
    cli.check_out(run, resume=True)
    cli.check_out(run, overwrite=True)


def test_overwrite_replaces_only_a_run_of_the_same_script_and_never_an_input(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text('{"kind": "planning"}')
    cli.check_out(run, overwrite=True, inputs=[tmp_path / "data", "Qwen/Qwen3-VL-4B-Instruct"], script="evaluate.py")
    for script in ("sft.py", "opcd.py", "merge.py"):
        with pytest.raises(SystemExit):
            cli.check_out(run, overwrite=True, script=script)
    for out in (run, tmp_path, run / "inner"):  # is, contains, lies inside
        with pytest.raises(SystemExit):
            cli.check_out(out, overwrite=True, inputs=[run], script="evaluate.py")


def test_opcd_writes_a_steps_log_line_before_its_checkpoint_and_saves_every_n_steps(tiny_model, world, tmp_path,
                                                                                     monkeypatch):
    """A kill during the checkpoint write used to lose the step's log line (it was written after)."""
    args = ["--model", tiny_model, "--teacher", tiny_model, "--data", str(world["data"]), "--rollout", "hf",
            "--batch-size", "2", "--micro-batch-size", "2", "--max-new-tokens", "6", "--lr", "1e-4"]
    opcd.main(args + ["--out", str(tmp_path / "every"), "--max-steps", "3", "--val-every", "100", "--save-every", "2"])
    saved = [json.loads(x)["step"] for x in (tmp_path / "every" / "log.jsonl").read_text().splitlines()
             if "rank_weight_checksums" in json.loads(x)]
    assert saved == [2, 3]  # --save-every 2, and the last step

    real_save = common.save_model

    def killed_while_saving_last(model, processor, path, *a, **kw):
        if Path(path).name == "last":
            raise KeyboardInterrupt("killed")
        return real_save(model, processor, path, *a, **kw)

    monkeypatch.setattr(common, "save_model", killed_while_saving_last)
    with pytest.raises(KeyboardInterrupt):
        opcd.main(args + ["--out", str(tmp_path / "killed"), "--max-steps", "1"])
    assert [json.loads(x)["step"] for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()] == [1]


def test_evaluate_default_out_names_the_whole_model_path(world, tmp_path, monkeypatch):
    """Every run's `.../best` used to land in the same runs/eval/best-... folder."""
    monkeypatch.chdir(tmp_path)
    for model in ("runs/a/best", "runs/b/best"):
        evaluate.main(["--model", model, "--backend", "oracle", "--data", str(world["data"])])
    assert sorted(p.name for p in (tmp_path / "runs" / "eval").iterdir()) == [
        "runs_a_best-oracle-planning", "runs_b_best-oracle-planning"]


def test_a_trailing_blank_line_does_not_fail_a_split(world, tmp_path):
    shutil.copytree(world["data"], tmp_path / "d")
    with open(tmp_path / "d" / "data.jsonl", "a") as f:
        f.write("\n\n")
    assert len(splits.load_split(tmp_path / "d")) == len(splits.load_split(world["data"]))


def test_a_validation_split_that_is_the_training_split_is_warned_about(tiny_model, world, tmp_path, capsys):
    opcd.main([str(a) for a in ["--model", tiny_model, "--teacher", tiny_model, "--data", world["data"], "--val-data",
                                world["data"], "--val-size", 2, "--out", tmp_path / "run", "--rollout", "hf", "--batch-size",
                                2, "--max-new-tokens", 4, "--max-steps", 1]])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --val-data is --data: the best checkpoint is chosen on training instances"]


@pytest.mark.parametrize("script", ["sft", "envs"])
def test_ctrl_c_is_one_line_and_exit_130(script, tiny_model, world, tmp_path):
    """Ctrl-C in a training run, and in a data writer with worker processes, printed tracebacks."""
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    argv = {"sft": ["sft.py", "--model", tiny_model, "--data", world["data"], "--out", out, "--batch-size", 2,
                    "--micro-batch-size", 1, "--epochs", 1000],
            "envs": ["envs.py", "data", "--out", out, "--split", "train", "--tasks", "maze", "--levels", 8, "--per-level",
                     20000, "--workers", 2]}[script]  # a minute of work at least
    proc = subprocess.Popen([sys.executable, *map(str, argv)], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started = (lambda: (out / "log.jsonl").is_file()) if script == "sft" else (lambda: any(tmp_path.glob(".out.tmp-*")))
    deadline = time.time() + 120  # interrupted once it trains / writes
    while time.time() < deadline and not started():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("sft:")]  # but the progress bar
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), lines
    if script == "envs":
        assert not out.exists()
