"""Bad input, reused folders and interrupted runs, across every script: one line on stderr naming the
problem, exit code 2, and the output folder exactly as it was. The catalogue runs in-process (most
cases fail at parse time and load no model)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

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


# Weights that hold NaN or inf, and flags that would make them: refused before any work.
NON_FINITE = [(script, [flag, "{%s}" % model, *extra], "hold NaN or inf")
              for model in ("inf_weight", "nan_weight")
              for script, flag, extra in (("sft", "--model", []), ("opcd", "--model", []), ("opcd", "--teacher", []),
                                          ("evaluate", "--model", ["--backend", "hf"]),
                                          ("merge", "--base", ["--adapter", "{adapter}"]),
                                          ("merge-checkpoint", "--base", ["--checkpoint", "{other_checkpoint}"]))] + [
    ("merge", ["--adapter", "{adapter_nan}"], "hold NaN or inf"),
    ("opcd", ["--teacher", "{wide_vocab}"], "output vocabularies must be the same"),
] + [(script, [flag, "{narrow_vocab}", *extra], "its embedding")  # token ids past the embedding
     for script, flag, extra in (("sft", "--model", []), ("opcd", "--model", []), ("opcd", "--teacher", []),
                                 ("evaluate", "--model", ["--backend", "hf"]), ("merge", "--base", ["--adapter", "{adapter}"]))]
# Files that exist but cannot be read: models, adapters, checkpoints, pictures.
BROKEN_FILES = [(script, [flag, "{%s}" % name, *extra], expected)
                for name, expected in (("config_garbage", "config_garbage: cannot load"),
                                       ("config_list", "config_list: cannot load"),
                                       ("tokenizer_garbage", "tokenizer_garbage: cannot load"))
                for script, flag, extra in (("sft", "--model", []), ("opcd", "--model", []), ("opcd", "--teacher", []),
                                            ("evaluate", "--model", ["--backend", "hf"]),
                                            ("merge", "--base", ["--adapter", "{adapter}"]))] + [
    (script, [flag, "{%s}" % name, *extra], "chat template")
    for name in ("template_syntax", "template_raises")
    for script, flag, extra in (("sft", "--model", []), ("opcd", "--model", []), ("opcd", "--teacher", []),
                                ("evaluate", "--model", ["--backend", "hf"]))] + [
    (script, ["--data", "{bad:%s}" % name], "cannot be decoded")
    for name in ("png_truncated", "png_garbage", "png_bad_crc", "png_bomb") for script in ("sft", "opcd", "evaluate")] + [
    ("merge", ["--adapter", "{adapter_no_r}"], "not a LoRA adapter config"),
    ("merge", ["--adapter", "{adapter_r_string}"], "not a LoRA adapter config"),
    ("merge", ["--adapter", "{adapter_alpha_huge}"], "not a LoRA adapter config"),
    ("merge", ["--adapter", "{adapter_config_garbage}"], "not a LoRA adapter config"),
    ("merge", ["--adapter", "{adapter_other_rank}"], "this base and rank 8 need"),
    ("merge", ["--adapter", "{adapter_truncated}"], "cannot read the adapter's weights"),
    ("merge", ["--base", "{other_base}", "--adapter", "{adapter}"], "was trained on another base model"),
    ("merge-checkpoint", ["--checkpoint", "{other_checkpoint}"], "a checkpoint of another model?"),
    ("merge-checkpoint", ["--checkpoint", "{checkpoint_truncated}"], "cannot read it"),
] + [("merge", ["--adapter", "{adapter}", "--device", device], "--device") for device in ("tpu", "cuda:7", "nonsense", "")]
# A served teacher's flags: only http(s) URLs, timeouts that are numbers of seconds.
SERVED_FLAGS = [("opcd", ["--teacher-url", url], "--teacher-url")
                for url in ("file:///etc/passwd", "ftp://127.0.0.1/v1", "localhost:8000/v1", "http://", "http://host:port/v1",
                            "javascript:alert(1)", "")] + [
    ("opcd", ["--teacher-url", "http://127.0.0.1:1/v1", "--teacher-timeout-seconds", value], "--teacher-timeout-seconds")
    for value in ("0", "-1", "nan", "1e308", "x")]
# Outputs that would replace or mix with what is there.
OUTPUTS = [
    ("envs", ["show", "maze", "--level", "3", "--seed", "1", "--out", "{file}"], "exists; --overwrite replaces it"),
    ("envs", ["show", "maze", "--level", "3", "--seed", "1", "--out", "{tmp}"], "is a folder"),
    ("pipeline", ["--base", "{model}", "--out", "{model}/inside"], "lies inside the base model"),
    ("pipeline", ["--out", "{data}"], "holds other files than a pipeline run's"),
    ("pipeline", ["--out", "{tmp}/bad-settings"], "is not a pipeline's settings"),
    ("sft", ["--model", "{model}", "--val-data", "{data}", "--max-new-tokens", "1000000000000"], "exceeds the model's context"),
] + [(script, ["--lr", lr], "--lr") for script in ("sft", "opcd") for lr in ("1e308", "2", "inf")]
# Numbers past what the program can use: 64-bit seeds, huge ratios, sizes that would exhaust memory.
LIMITS = [(script, [*extra, "--seed", seed], "--seed") for seed in ("4294967296", "1e3", "18446744073709551616")
          for script, extra in (("sft", []), ("opcd", []), ("pipeline", ["--out", "{out}"]),
                                ("tiny", ["model", "--out", "{out}"]),
                                ("envs", ["show", "maze", "--level", "3", "--out", "{out}.png"]))] + [
    ("sft", ["--warmup-ratio", "1e308"], "--warmup-ratio"), ("sft", ["--warmup-ratio", "1.5"], "--warmup-ratio"),
    ("sft", ["--lora-alpha", "1e308"], "--lora-alpha"), ("sft", ["--lora-alpha", "inf"], "--lora-alpha"),
    ("evaluate", ["--timeout-seconds", "1e308"], "--timeout-seconds"),
    ("tiny", ["model", "--out", "{out}", "--image-size", "1048576"], "at most 2048"),
    ("tiny", ["grids", "--out", "{out}", "--split", "train", "--count", "1", "--canvas", "100000"], "at most 2048"),
    ("tiny", ["grids", "--out", "{out}", "--split", "train", "--count", "1", "--cell-size", "0"], "at least 8"),
    ("tiny", ["grids", "--out", "{out}", "--split", "train", "--count", "1000000000"], "at most 1000000"),
    ("envs", ["data", "--out", "{out}", "--split", "train", "--per-level", "1", "--image-size", "100000"], "out of range"),
    ("envs", ["show", "maze", "--level", "3", "--seed", "1", "--image-size", "100000", "--out", "{out}.png"],
     "out of range"),
] + [(script, [*extra, "--out", "{dangling}"], "symbolic link to nothing")
     for script, extra in (("sft", []), ("opcd", []), ("evaluate", []), ("merge", ["--adapter", "{adapter}"]))] + [
    (script, [*extra, "--out", "/proc/mgsd-out"], "cannot write into")
    for script, extra in (("sft", []), ("opcd", []), ("evaluate", []), ("merge", ["--adapter", "{adapter}"]))] + [
    ("pipeline", ["--aggregate", "{tmp}/agg-garbage"], "--aggregate"),
    ("pipeline", ["--aggregate", "{tmp}/agg-list"], "--aggregate"),
    ("pipeline", ["--aggregate", "{tmp}/agg-shape"], "--aggregate"),
    ("pipeline", ["--aggregate", "{tmp}/agg-settings", "{tmp}/agg-a"], "--aggregate"),
    ("pipeline", ["--aggregate", "{tmp}/agg-settings-garbage"], "--aggregate"),
    ("benchmarks", ["vsp", "{tmp}", "--out", "{tmp}/imported"], "lies inside the source"),
    ("benchmarks", ["vsp", "{tmp}", "--out", "{tmp}"], "lies inside the source"),
    ("benchmarks", ["visualplanning", "{file}", "--out", "{file}/x"], "lies inside the source"),
    ("benchmarks", ["vsp", "{tmp}/nowhere", "--out", "{out}", "--image-size", "100000"], "--image-size"),
    ("benchmarks", ["vsp", "{tmp}/nowhere", "--out", "{out}", "--image-size", "0"], "--image-size"),
    ("benchmarks", ["vsp", "{tmp}/nowhere", "--out", "{out}", "--cell-size", "0"], "--cell-size"),
    ("benchmarks", ["vsp", "{tmp}/nowhere", "--out", "{out}", "--image-size", "x"], "--image-size"),
    ("benchmarks", ["nonsense", "{tmp}", "--out", "{out}"], "invalid choice"),
    ("tiny", ["model", "--out", "{model}/inner", "--tokenizer", "{model}"], "lies inside the --tokenizer folder"),
    ("tiny", ["model", "--out", "{out}", "--size", "huge"], "invalid choice"),
    ("tiny", ["grids", "--out", "{out}", "--split", "nope", "--count", "1"], "invalid choice"),
    ("tiny", ["grids", "--out", "{out}", "--split", "train", "--count", "x"], "--count"),
    ("envs", ["show", "sokoban", "--level", "3", "--seed", "1"], "invalid choice"),
    ("envs", ["show", "maze", "--level", "300000", "--seed", "1", "--out", "{out}.png"], "out of range"),
    ("envs", ["show", "maze", "--level", "x", "--seed", "1"], "--level"),
    ("envs", ["data", "--out", "{out}", "--split", "train", "--per-level", "x"], "--per-level"),
    ("envs", ["data", "--out", "{out}", "--split", "train", "--per-level", "1", "--levels", "maze=200000"],
     "out of range"),
    ("evaluate", ["--backend", "openai", "--base-url", "gopher://127.0.0.1/v1"], "--base-url"),
    ("merge", ["--adapter", "{adapter}", "--tolerance", "nan"], "--tolerance"),
    ("merge", ["--adapter", "{adapter}", "--tolerance", "-1"], "--tolerance"),
    ("opcd", ["--teacher-retries", "1e308"], "--teacher-retries"),
    ("evaluate", ["--backend", "openai", "--base-url", "http://user:pw@example.com/v1"], "--base-url"),
    ("evaluate", ["--backend", "openai", "--base-url", "http://127.0.0.1:1/v1", "--api-key-env", "sk-secret-123"],
     "--api-key-env"),
]

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
        *[(script, ["--data", "{bad:image_disagrees}"], "another picture than the row's image")
          for script in ("sft", "opcd", "evaluate")],
        ("sft", ["--data", "{bad:not_json}"], "malformed JSON"),
        ("sft", ["--data", "{bad:not_object}"], "a row must be a JSON object"),
        ("sft", ["--data", "{bad:plan_string}"], "plan must be a list"),
        ("sft", ["--val-data", "{bad:no_assistant}"], "no assistant turn"),
        ("sft", ["--data", "{bad:plan_not_shortest}"], "the shortest has"),
        ("sft", ["--data", "{bad:plan_misses_goal}"], "does not reach the goal"),
        *[(script, ["--data", "{bad:state_plan_differs}"], "is not the row's") for script in ("sft", "opcd", "evaluate")],
        *[(script, ["--data", "{bad:answer_plan_differs}", *extra], "the assistant's plan is not the row's plan")
          for script, extra in (("sft", ["--kinds", "planning"]), ("opcd", []), ("evaluate", []))],
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
    ] + NON_FINITE + BROKEN_FILES + SERVED_FLAGS + OUTPUTS + LIMITS)

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
    "state_plan_differs": lambda r: r.update(state=_state(r, plan=list(reversed(json.loads(r["state"])["plan"])))),
    "answer_plan_differs": lambda r: [item.update(text=item["text"].replace("<answer>", "<answer>U"))
                                      for item in r["messages"][-1]["content"]],
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


def _png_bomb(_):
    """A valid PNG header that declares 60000 x 60000 pixels (3.6e9): decoding it would take gigabytes."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


BAD_PICTURES = {
    "png_truncated": lambda data: data[:len(data) // 2],
    "png_garbage": lambda data: data[:8] + b"garbage" * 20,
    "png_bad_crc": lambda data: data[:30] + bytes([data[30] ^ 0xFF]) + data[31:],
    "png_bomb": _png_bomb,
}


def _edit_weights(folder, change):
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _one_value(value):
    def change(tensors):
        name = sorted(k for k in tensors if "layers.0.mlp.up_proj" in k)[0]
        tensors[name].view(-1)[3] = value
    return change


def _wider_vocabulary(folder):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder)
    model.resize_token_embeddings(model.get_input_embeddings().num_embeddings + 64)
    model.save_pretrained(folder)


def _narrower_vocabulary(folder):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(folder)
    model.resize_token_embeddings(len(AutoTokenizer.from_pretrained(folder)) - 8)
    model.save_pretrained(folder)


def _json_edit(name, change):
    def edit(folder):
        path = folder / name
        path.write_text(change(path.read_text()))
    return edit


BAD_MODELS = {  # copies of the tiny model, each broken in one way
    "inf_weight": lambda f: _edit_weights(f, _one_value(float("inf"))),
    "nan_weight": lambda f: _edit_weights(f, _one_value(float("nan"))),
    "wide_vocab": _wider_vocabulary,
    "narrow_vocab": _narrower_vocabulary,
    "config_garbage": _json_edit("config.json", lambda text: text[:len(text) // 2]),
    "config_list": _json_edit("config.json", lambda text: "[1, 2]"),
    "tokenizer_garbage": _json_edit("tokenizer.json", lambda text: text[:len(text) // 3]),
    "template_syntax": _json_edit("chat_template.jinja", lambda text: "{% for m in messages %}{{ m.role }"),
    "template_raises": _json_edit("chat_template.jinja", lambda text: "{{ raise_exception('no chats here') }}"),
}


def adapters(root, tiny_model):
    """A real LoRA adapter of the tiny model and broken copies of it; an sft.py --full checkpoint of another shape."""
    from safetensors.torch import load_file, save_file

    from mgsd import lora

    model, _ = common.load_model(tiny_model)
    up_proj = next(n for n, _ in model.named_parameters() if "layers.0.mlp.up_proj.weight" in n)
    lora.add_lora(model, rank=4, alpha=8)
    good = lora.save_adapter(model, root / "adapter", tiny_model)
    made = {"adapter": good,  # a base of the same shapes with other weights (seed 1), the tokenizer shared
            "other_base": tiny.build_model(root / "other-base", size="tiny", seed=1, tokenizer=tiny_model)}

    def variant(name, change_config=None, change_weights=None, cut=False):
        folder = made[name] = root / name
        shutil.copytree(good, folder)
        if change_config:
            config = json.loads((folder / "adapter_config.json").read_text())
            change_config(config)
            (folder / "adapter_config.json").write_text(json.dumps(config))
        weights = folder / "adapter_model.safetensors"
        if change_weights:
            tensors = load_file(str(weights))
            change_weights(tensors)
            save_file(tensors, str(weights))
        if cut:
            weights.write_bytes(weights.read_bytes()[:100])

    variant("adapter_no_r", lambda c: c.pop("r"))
    variant("adapter_r_string", lambda c: c.update(r="four"))
    variant("adapter_other_rank", lambda c: c.update(r=8))
    variant("adapter_alpha_huge", lambda c: c.update(lora_alpha=1e308))
    variant("adapter_truncated", cut=True)
    variant("adapter_nan", change_weights=lambda t: next(v for k, v in sorted(t.items()) if "lora_B" in k).fill_(float("nan")))
    (root / "adapter_config_garbage").mkdir()
    shutil.copy(good / "adapter_model.safetensors", root / "adapter_config_garbage")
    (root / "adapter_config_garbage" / "adapter_config.json").write_text("{not json")
    made["adapter_config_garbage"] = root / "adapter_config_garbage"
    other = made["other_checkpoint"] = root / "other-checkpoint"  # sft.py --full's layout, tensors of another shape
    other.mkdir()
    save_file({up_proj: torch.zeros(3, 3)}, str(other / "trainable.safetensors"))
    cut = made["checkpoint_truncated"] = root / "checkpoint-truncated"
    cut.mkdir()
    (cut / "trainable.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1")
    return made


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_model, make_data):
    """A tiny model, good data, a folder holding a finished-looking run, broken copies of model and data."""
    root = tmp_path_factory.mktemp("catalogue")
    data = Path(make_data("train", 6, tasks=["frozenlake"], levels=[3], kinds=("perception", "planning")))
    run = root / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1}\n')
    (root / "a-file").write_text("x")
    (root / "bad-settings").mkdir()
    (root / "bad-settings" / "settings.json").write_text('{"seed": ')
    dangling = tmp_path_factory.mktemp("links") / "dangling"  # outside root, whose snapshot follows links
    dangling.symlink_to(root / "nowhere-at-all")
    for name, results, settings in (("agg-garbage", '{"a": ', None), ("agg-list", "[1, 2]", None),
                                    ("agg-shape", '{"MGSD": {"conditions": 5}}', None),
                                    ("agg-settings", "{}", "[1]"), ("agg-settings-garbage", "{}", "{x")):
        (root / name).mkdir()
        (root / name / "results.json").write_text(results)
        if settings:
            (root / name / "settings.json").write_text(settings)
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
    other_picture = json.loads(lines[-1])["image"]  # the last instance's
    edits = {**BAD_ROWS, "id_shared": lambda r: r.update(id=last[r["kind"]]),
             "image_disagrees": lambda r: r.update(image=other_picture)}
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
    for name, corrupt in BAD_PICTURES.items():  # the picture of the first rows, broken in place
        folder = root / f"bad-{name}"
        shutil.copytree(data, folder)
        picture = folder / json.loads(lines[1])["image"]
        picture.write_bytes(corrupt(picture.read_bytes()))
        bad[name] = folder
    models = {}
    for name, change in BAD_MODELS.items():
        models[name] = root / name
        shutil.copytree(tiny_model, models[name])
        change(models[name])
    return {"tmp": root, "model": tiny_model, "data": data, "run": run, "file": root / "a-file", "no_tokenizer": no_tok,
            "truncated": truncated, "missing_tensor": missing_tensor, "bad": bad, "dangling": dangling, **models,
            **adapters(root, tiny_model)}


SCRIPTS = {"sft": sft.main, "opcd": opcd.main, "evaluate": evaluate.main, "merge": merge.main,
           "merge-checkpoint": merge.main, "envs": splits.main,
           "tiny": tiny.main, "benchmarks": benchmarks.main, "pipeline": pipeline.main}


def base_args(script, w, out):
    return {"sft": ["--model", w["model"], "--data", w["data"], "--out", out, "--batch-size", 4, "--micro-batch-size", 4,
                    "--max-steps", 1],
            "opcd": ["--model", w["model"], "--teacher", w["model"], "--data", w["data"], "--out", out, "--rollout", "hf",
                     "--batch-size", 2, "--max-steps", 1],
            "evaluate": ["--model", "oracle", "--backend", "oracle", "--data", w["data"], "--out", out],
            "merge": ["--base", w["model"], "--adapter", w["tmp"] / "no-adapter", "--out", out],
            "merge-checkpoint": ["--base", w["model"], "--checkpoint", w["tmp"] / "no-checkpoint", "--out", out],
            }.get(script, [])


def fill(arg, w, out):
    arg = str(arg)
    if arg.startswith("{bad:"):
        return str(w["bad"][arg[5:-1]])
    return arg.format(out=out, **{k: v for k, v in w.items() if k != "bad"})


def snapshot(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in Path(root).rglob("*")}


def test_the_catalogue_has_over_a_hundred_cases():
    assert len(CASES) >= 100 and {script for script, _, _ in CASES} == set(SCRIPTS)


def test_the_catalogue_has_450_cases_and_no_case_twice():
    assert len(CASES) >= 450 and len({(s, tuple(e)) for s, e, _ in CASES}) == len(CASES)


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


def test_a_second_run_into_a_folder_in_use_is_refused_in_one_line(tiny_model, world, tmp_path):
    """Two runs into one --out used to race: one deleted the other's temporary checkpoint. The folder is locked
    (flock) by the run that writes it; another process is refused, whatever its flags, and changes nothing."""
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mgsd import cli; cli.claim_out(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(out)],
                              cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "args.json").write_text(json.dumps({"kinds": "planning"}))  # what the first run has written so far
        before = snapshot(out)
        for script, argv in (("sft", base_args("sft", world, out) + ["--overwrite"]),
                             ("opcd", base_args("opcd", world, out) + ["--overwrite"])):
            with pytest.raises(SystemExit) as exit_info:
                SCRIPTS[script]([str(a) for a in argv])
            assert exit_info.value.code == 2 and snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()
    sft.main([str(a) for a in base_args("sft", world, out) + ["--overwrite"]])  # free again once the first run ends
    assert (out / "model").is_dir() or (out / "adapter").is_dir()


@pytest.mark.parametrize("script", ["sft", "opcd"])
def test_resume_refuses_data_that_changed_and_reads_a_torn_log_line(script, tiny_model, world, make_data, tmp_path,
                                                                      capsys):
    out = tmp_path / "run"
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    argv = [str(a) for a in base_args(script, world, out)]
    argv[argv.index("--data") + 1] = str(data)
    argv[argv.index("--max-steps") + 1] = "1"
    SCRIPTS[script](argv + (["--epochs", "4"] if script == "sft" else []))
    log = out / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 2, "lo')  # a kill in the middle of a line
    more = argv[:argv.index("--max-steps")] + ["--max-steps", "2"] + argv[argv.index("--max-steps") + 2:]
    SCRIPTS[script](more + (["--epochs", "4"] if script == "sft" else []) + ["--resume"])
    assert [json.loads(x)["step"] for x in log.read_text().splitlines() if "loss" in json.loads(x)] == [1, 2]
    other = make_data("train", 6, tasks=["maze"], levels=[3], kinds=("perception", "planning"))
    shutil.rmtree(data)
    shutil.copytree(other, data)  # maze rows where the run trained on frozenlake rows
    before = snapshot(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script](more[:more.index("--max-steps")] + ["--max-steps", "3"] + more[more.index("--max-steps") + 2:]
                        + (["--epochs", "4"] if script == "sft" else []) + ["--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "holds other rows than when the run started" in err, err
    assert snapshot(out) == before


@pytest.mark.parametrize("part", ["trainable.safetensors", "optimizer.pt", "state.json", "trainer_state.pt"])
def test_resume_from_a_truncated_checkpoint_is_one_line(part, tiny_model, world, tmp_path, capsys):
    script = "opcd" if part == "trainer_state.pt" else "sft"
    out = tmp_path / "run"
    argv = [str(a) for a in base_args(script, world, out)] + (["--epochs", "4"] if script == "sft" else [])
    SCRIPTS[script](argv)
    path = out / ("last" if script == "opcd" else "checkpoint") / part
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    before = snapshot(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script](argv[:argv.index("--max-steps")] + ["--max-steps", "2"] + argv[argv.index("--max-steps") + 2:]
                        + ["--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "cannot" in err, err
    assert snapshot(out) == before


def test_requests_that_carry_a_key_bypass_a_proxy_unless_asked(world, tmp_path, monkeypatch):
    """With $http_proxy set, every request (its Authorization header included) went to the proxy. Two real HTTP
    servers: the endpoint, and a proxy that records what reaches it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = {"endpoint": [], "proxy": []}

    def server(name):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                seen[name].append(self.headers.get("Authorization"))
                body = json.dumps({"choices": [{"message": {"content": "Plan: R"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"

    endpoint, endpoint_url = server("endpoint")
    proxy, proxy_url = server("proxy")
    monkeypatch.setenv("http_proxy", proxy_url)
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("MGSD_TEST_KEY", "sk-secret-123")
    argv = ["--model", "m", "--backend", "openai", "--base-url", endpoint_url + "/v1", "--api-key-env", "MGSD_TEST_KEY",
            "--data", str(world["data"]), "--limit", "2", "--retries", "0"]
    try:
        evaluate.main(argv + ["--out", str(tmp_path / "direct")])
        assert seen == {"endpoint": ["Bearer sk-secret-123"] * 2, "proxy": []}
        evaluate.main(argv + ["--out", str(tmp_path / "proxied"), "--proxy-from-env"])
        assert seen["proxy"] == ["Bearer sk-secret-123"] * 2 and len(seen["endpoint"]) == 2
    finally:
        endpoint.shutdown()
        proxy.shutdown()


@pytest.mark.parametrize("key", ["sk-abc\n", "sk-abc\r\nX-Other: 1", " sk-abc", "sk-äbc"])
def test_an_api_key_no_header_can_carry_is_refused_before_any_request(key, world, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MGSD_TEST_KEY", key)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "m", "--backend", "openai", "--base-url", "http://127.0.0.1:1/v1", "--api-key-env",
                       "MGSD_TEST_KEY", "--data", str(world["data"]), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "MGSD_TEST_KEY" in err and key.strip() not in err
    assert not (tmp_path / "out").exists()


def test_a_second_evaluation_into_a_folder_in_use_is_refused(world, tmp_path, capsys):
    """Two evaluations at once used to end in a traceback at os.replace."""
    import subprocess
    import sys

    out = tmp_path / "eval"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mgsd import cli; cli.claim_out(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(out)],
                              cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "run.json").write_text(json.dumps({"kind": "planning"}))
        before = snapshot(out)
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main([str(a) for a in base_args("evaluate", world, out)] + ["--overwrite"])
        assert exit_info.value.code == 2 and "in use by another run" in capsys.readouterr().err
        assert snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_ctrl_c_in_the_pipeline_stops_its_stage_and_is_one_line(tmp_path):
    """The pipeline printed a KeyboardInterrupt traceback and left its running stage behind."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "mini"
    proc = subprocess.Popen([sys.executable, "pipeline.py", "--quick", "--out", str(out)],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("**/logs/*.log")):  # a stage is running
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)  # to the pipeline alone: it must stop its stage itself
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and "error: interrupted" in lines[0], lines
    stages = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert stages == [], stages  # no stage of this run is left running


def test_a_failed_pipeline_stage_is_one_line_and_exit_2(world, tmp_path):
    """A base whose weights hold NaN: the first evaluation refuses it; the pipeline used to exit 1."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "pipeline.py", "--base", str(world["nan_weight"]), "--out",
                             str(tmp_path / "mini"), "--backend", "hf"], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: stage failed") and "NaN or inf" in errors[0], errors


def test_a_grid_row_of_an_unknown_size_is_refused_before_the_oracle_runs(tmp_path, capsys):
    """A vision row of level 200000 hung the oracle (it solved the grid)."""
    grids = tiny.write_grids(tmp_path / "grids", "test", 2)
    lines = (grids / "data.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["level"] = 200000
    row["state"] = json.dumps({**json.loads(row["state"]), "level": 200000})
    (grids / "data.jsonl").write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--model", "oracle", "--backend", "oracle", "--kind", "vision", "--data", str(grids), "--out",
                       str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "a grid row's level must be one of" in err and not (tmp_path / "eval").exists()
