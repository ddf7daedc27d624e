"""--report-to: the trackers' own files, read back with their own readers (TensorBoard's event accumulator; the
wandb offline run file as wandb writes it), hold what log.jsonl holds; no key is ever written; an uninstalled
tracker is refused before any work; a tracker that fails mid-run never stops training."""
import json
import struct
from pathlib import Path

import pytest

import opcd
import sft
from mgsd import tracking


def log_lines(out):
    return [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]


def sft_args(tiny_model, data, out, *extra):
    return [str(a) for a in ["--model", tiny_model, "--data", data, "--out", out, "--batch-size", 2,
                             "--micro-batch-size", 2, "--full", "--epochs", 10, "--max-steps", 3, "--kinds", "planning",
                             *extra]]


def test_tensorboard_event_files_hold_the_logged_numbers(tiny_model, make_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_data("train", 2, tasks=["frozenlake"], kinds=("planning",))
    sft.main(sft_args(tiny_model, data, tmp_path / "run", "--report-to", "tensorboard"))
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = [e for e in log_lines(tmp_path / "run") if "loss" in e]
    assert [e["step"] for e in logged] == [1, 2, 3]
    for key in ("loss", "grad_norm", "lr"):
        read = [(s.step, s.value) for s in events.Scalars(key)]
        assert read == [(e["step"], pytest.approx(e[key], rel=1e-6)) for e in logged], key
    settings = events.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"lr": 0.0001' in settings and '"report_to": "tensorboard"' in settings


def wandb_records(path):
    """The records of a wandb run file: a 7-byte header (":W&B", magic, version), then LevelDB-log records in
    32 KiB blocks (crc32c, length, type; type 1 whole, 2-4 first/middle/last part), each a wandb Record protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, parts = Path(path).read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts, pos = parts + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def test_wandb_offline_run_holds_the_logged_numbers_and_settings_and_no_key(tiny_model, make_data, tmp_path,
                                                                             monkeypatch):
    key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = make_data("train", 2, tasks=["frozenlake"], kinds=("planning",))
    out = tmp_path / "run"
    opcd.main([str(a) for a in ["--model", tiny_model, "--teacher", tiny_model, "--data", data, "--out", out,
                                "--rollout", "hf", "--batch-size", 2, "--max-new-tokens", 6, "--max-steps", 2,
                                "--lr", 1e-4, "--report-to", "wandb"]])
    run_file = next(out.glob("wandb/offline-run-*/run-*.wandb"))
    history, config = {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            history[items["_step"]] = items
        elif kind == "run":
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update}
    logged = log_lines(out)
    assert sorted(history) == [e["step"] for e in logged] == [1, 2]
    for entry in logged:
        for name in ("reverse_kl", "loss", "grad_norm", "success", "response_tokens"):
            assert history[entry["step"]][name] == pytest.approx(entry[name], rel=1e-9), name
    assert config["lr"] == 1e-4 and config["loss"] == "sampled" and config["report_to"] == "wandb"
    assert not any(key.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())


@pytest.mark.parametrize("script", ["sft", "opcd", "pipeline"])
def test_an_uninstalled_tracker_is_one_line_before_any_work(script, tiny_model, make_data, tmp_path, capsys):
    """swanlab is in requirements-track.txt, not in the test environment: the refusal is tested with it."""
    import pipeline

    if tracking.importlib.util.find_spec("swanlab") is not None:
        pytest.skip("swanlab is installed here")
    data = make_data("train", 2, tasks=["frozenlake"], kinds=("planning",))
    argv = {"sft": sft_args(tiny_model, data, tmp_path / "run"),
            "opcd": [str(a) for a in ["--model", tiny_model, "--teacher", tiny_model, "--data", data, "--out",
                                      tmp_path / "run", "--rollout", "hf", "--batch-size", 2]],
            "pipeline": ["--out", str(tmp_path / "run")]}[script]
    with pytest.raises(SystemExit) as exit_info:
        {"sft": sft.main, "opcd": opcd.main, "pipeline": pipeline.main}[script](argv + ["--report-to", "swanlab"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "swanlab is not installed" in err
    assert not (tmp_path / "run").exists()


def test_a_tracker_that_fails_mid_run_never_stops_training(tiny_model, make_data, tmp_path, monkeypatch, capsys):
    calls = []

    def broken(self, metrics, step):
        calls.append(step)
        raise ConnectionError("the tracking server went away")

    monkeypatch.setattr(tracking.TensorBoard, "log", broken)
    data = make_data("train", 2, tasks=["frozenlake"], kinds=("planning",))
    sft.main(sft_args(tiny_model, data, tmp_path / "run", "--report-to", "tensorboard"))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: --report-to" in line]  # after a bar
    assert calls == [1] and len(warnings) == 1 and "ConnectionError" in warnings[0]  # tried once, then off
    assert [e["step"] for e in log_lines(tmp_path / "run") if "loss" in e] == [1, 2, 3]
    assert (tmp_path / "run" / "model" / "config.json").is_file()
