"""Nothing non-finite is trained on or saved: a served teacher's bad answers (from a real HTTP server), learning
rates that blow the weights up, adapters that overflow, and the optimiser's clip and reduction."""
import json
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import merge
import opcd
import sft
from mgsd import common, lora, optim


def tensors_on_disk(folder):
    """Every tensor of every .safetensors file under `folder`."""
    return {f"{path}:{name}": t for path in Path(folder).rglob("*.safetensors") for name, t in load_file(str(path)).items()}


def all_finite(folder):
    tensors = tensors_on_disk(folder)
    return all(torch.isfinite(t).all() for t in tensors.values())


class Teacher:
    """A real HTTP server that answers as `vllm serve` does (/tokenize with the student's tokenizer,
    /v1/completions with prompt log-probs), except that from request number `bad_from` on, `spoil` changes each
    answer (a dict, or bytes for a body that is not JSON)."""

    def __init__(self, tokenizer, spoil=None, bad_from=0, tokenize=None):
        self.requests, outer = 0, self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    answer = tokenize(body) if tokenize else {
                        "tokens": tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]}
                else:
                    outer.requests += 1
                    answer = outer.answer(body["prompt"], body["prompt_logprobs"])
                    if spoil is not None and outer.requests > bad_from:
                        answer = spoil(answer)
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @staticmethod
    def answer(ids, topk):
        """Every position: its own token at log-prob −1 (rank 1), then the smallest other ids at −3 (ranks 2..k)."""
        positions = [None]
        for t in ids[1:]:
            entry = {str(t): {"logprob": -1.0, "rank": 1}}
            for r, other in enumerate([v for v in range(topk + 1) if v != t][:max(topk - 1, 0)], 2):
                entry[str(other)] = {"logprob": -3.0, "rank": r}
            positions.append(entry)
        return {"choices": [{"text": "", "prompt_logprobs": positions}]}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def first_logprob(value):
    """Spoil: the first response position's own log-prob replaced by `value`."""
    def spoil(answer):
        entry = answer["choices"][0]["prompt_logprobs"][-1]
        next(iter(entry.values()))["logprob"] = value
        return answer
    return spoil


def drop_last(answer):
    answer["choices"][0]["prompt_logprobs"].pop()
    return answer


def top_ids_past(vocab):
    def spoil(answer):
        entry = answer["choices"][0]["prompt_logprobs"][-1]
        key = next(k for k, v in entry.items() if v["rank"] == 2)
        entry[str(vocab + 5)] = entry.pop(key)
        return answer
    return spoil


def fewer_tops(answer):
    for entry in answer["choices"][0]["prompt_logprobs"][1:]:
        for key in [k for k, v in entry.items() if v["rank"] > 1]:
            del entry[key]
    return answer


def nested(_):
    return b"[" * 100000 + b"]" * 100000


SPOILED = {  # what a served teacher may send back -> (--loss, text the error line must contain)
    "nan": (first_logprob(float("nan")), "sampled", "log-prob nan"),
    "inf": (first_logprob(float("inf")), "sampled", "log-prob inf"),
    "minus_inf": (first_logprob(float("-inf")), "sampled", "log-prob -inf"),
    "nan_string": (first_logprob("nan"), "sampled", "log-prob 'nan'"),
    "positive": (first_logprob(0.5), "sampled", "log-prob 0.5"),
    "null": (first_logprob(None), "sampled", "log-prob None"),
    "bool": (first_logprob(True), "sampled", "log-prob True"),
    "one_short": (drop_last, "sampled", "prompt log-probs for"),
    "top_id_past_vocab": (None, "topk", "ids below"),
    "fewer_tops": (fewer_tops, "topk", "top log-probs"),
    "nan_in_top": (None, "topk", "log-prob nan"),
    "not_json": (lambda _: b"<html>busy</html>", "sampled", "malformed answer"),
    "nested_deep": (nested, "sampled", "malformed answer"),
    "choices_number": (lambda _: {"choices": 5}, "sampled", "no valid prompt log-probs"),
    "list_body": (lambda _: [1, 2], "sampled", "no valid prompt log-probs"),
}


def opcd_args(tiny_model, data, out, url, loss="sampled", *extra):
    return [str(a) for a in ["--model", tiny_model, "--teacher", "teacher", "--teacher-url", url, "--data", data,
                             "--out", out, "--rollout", "hf", "--batch-size", 2, "--micro-batch-size", 2,
                             "--max-new-tokens", 6, "--max-steps", 2, "--lr", 1e-4, "--loss", loss, "--topk", 3,
                             "--teacher-retries", 0, *extra]]


@pytest.fixture(scope="module")
def served(tiny_model, make_data):
    from transformers import AutoTokenizer

    model, _ = common.load_model(tiny_model)
    return (AutoTokenizer.from_pretrained(tiny_model), make_data("train", 2, tasks=["frozenlake"], kinds=("planning",)),
            model.lm_head.out_features)


@pytest.mark.parametrize("case", list(SPOILED))
def test_a_served_teachers_bad_answer_stops_the_run_in_one_line_before_any_step(case, served, tiny_model, tmp_path,
                                                                                 capsys):
    tokenizer, data, vocab = served
    spoil, loss, expected = SPOILED[case]
    spoil = {"top_id_past_vocab": top_ids_past(vocab),
             "nan_in_top": lambda a: (next(v for v in a["choices"][0]["prompt_logprobs"][-1].values()
                                           if v["rank"] == 2).update(logprob=float("nan")) or a)}.get(case, spoil)
    teacher = Teacher(tokenizer, spoil)
    try:
        with pytest.raises(SystemExit) as exit_info:
            opcd.main(opcd_args(tiny_model, data, tmp_path / "run", teacher.url, loss))
    finally:
        teacher.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("error: ") and expected in err[-1], err[-3:]
    assert "step 1 was not taken" in err[-1] and not (tmp_path / "run" / "last").exists()
    assert all_finite(tmp_path / "run")


def test_a_served_nan_mid_run_keeps_the_last_good_checkpoint_and_resume_continues(served, tiny_model, tmp_path, capsys):
    """Step 1 is scored well and saved (--save-every 1); step 2's answers hold a NaN: exit 2, last/ at step 1, all
    finite; once the server answers well again, --resume takes step 2."""
    tokenizer, data, _ = served
    out = tmp_path / "run"
    teacher = Teacher(tokenizer, first_logprob(float("nan")), bad_from=2)  # a request a sequence: step 1's two are good
    teacher_good = Teacher(tokenizer)
    try:
        with pytest.raises(SystemExit) as exit_info:
            opcd.main(opcd_args(tiny_model, data, out, teacher.url, "sampled", "--save-every", 1))
        assert exit_info.value.code == 2
        assert "step 2 was not taken" in capsys.readouterr().err
        state = torch.load(out / "last" / "trainer_state.pt", weights_only=False)
        assert state["step"] == 1 and all_finite(out)
        assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1]
        opcd.main(opcd_args(tiny_model, data, out, teacher_good.url, "sampled", "--save-every", 1, "--resume"))
    finally:
        teacher.close()
        teacher_good.close()
    assert torch.load(out / "last" / "trainer_state.pt", weights_only=False)["step"] == 2
    assert (out / "done.json").is_file() and all_finite(out)


def test_a_served_tokenize_that_returns_a_list_is_one_line(served, tiny_model, tmp_path, capsys):
    tokenizer, data, _ = served
    teacher = Teacher(tokenizer, tokenize=lambda body: [1, 2, 3])
    try:
        with pytest.raises(SystemExit) as exit_info:
            opcd.main(opcd_args(tiny_model, data, tmp_path / "run", teacher.url))
    finally:
        teacher.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and "tokenizes text otherwise" in err[-1] and not (tmp_path / "run").exists()


def test_sft_from_weights_whose_forward_overflows_stops_at_the_first_step(tiny_model, make_data, tmp_path, capsys):
    """Finite weights (an MLP's gate and up scaled by 1e25) whose activations overflow: the loss and gradient are NaN; the step is
    not taken, nothing is written (the lr that used to do this, 1e308, is now refused at parse time)."""
    import shutil

    from safetensors.torch import save_file

    model = tmp_path / "overflowing"
    shutil.copytree(tiny_model, model)
    tensors = load_file(str(model / "model.safetensors"))
    for name in [k for k in tensors if "layers.0.mlp.up_proj" in k or "layers.0.mlp.gate_proj" in k]:
        tensors[name] = tensors[name] * 1e25
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    data = make_data("train", 2, tasks=["frozenlake"], kinds=("planning",))
    with pytest.raises(SystemExit) as exit_info:
        sft.main([str(a) for a in ["--model", model, "--data", data, "--out", tmp_path / "run", "--batch-size", 2,
                                   "--micro-batch-size", 2, "--full", "--max-steps", 2, "--kinds", "planning"]])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("error: step 1: gradient norm nan"), err[-3:]
    assert "no checkpoint was written yet" in err[-1] and tensors_on_disk(tmp_path / "run") == {}


def test_weights_that_are_not_finite_after_a_step_stop_the_run():
    """The net behind the gradient check: a step that leaves an infinite weight (here one already infinite) raises."""
    w = torch.nn.Parameter(torch.tensor([1.0, float("inf")]))
    opt = optim.MasterAdamW([w], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    w.grad = torch.full((2,), 1.0)
    with pytest.raises(optim.cli.NonFinite, match="weights NaN or inf"):
        opt.step(1.0)


def test_merge_refuses_an_adapter_whose_merge_overflows(tiny_model, tmp_path, capsys):
    """lora_B of 1e30: finite weights whose logits overflow; the check's difference is NaN, which used to pass."""
    model, _ = common.load_model(tiny_model)
    lora.add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(1e30)
    lora.save_adapter(model, tmp_path / "adapter", tiny_model)
    with pytest.raises(SystemExit) as exit_info:
        merge.main(["--base", tiny_model, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"),
                    "--device", "cpu"])
    assert exit_info.value.code != 0 and "nothing written" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_max_grad_norm_0_means_no_clipping():
    """It used to zero every gradient in opcd.py (clip to norm 0) while sft.py read 0 as off."""
    def step(max_norm):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(5))
        opt = optim.MasterAdamW([w], lr=0.1, betas=(0.9, 0.999), weight_decay=0.0)
        w.grad = torch.full((5,), 100.0)  # norm 223.6: a clip at 1 would scale it by 1/224
        norm = opt.step(max_norm)
        return w.detach().clone(), norm

    unclipped, norm = step(0)
    huge, _ = step(1e9)
    torch.manual_seed(0)
    start = torch.randn(5)
    assert norm == pytest.approx(math.sqrt(5) * 100)
    torch.testing.assert_close(unclipped, huge)
    assert (start - unclipped).abs().min() > 0.09  # Adam's first step moves each weight by lr


def test_a_non_finite_gradient_raises_and_leaves_the_weights_as_they_were():
    w = torch.nn.Parameter(torch.ones(3))
    opt = optim.MasterAdamW([w], lr=0.1, betas=(0.9, 0.999), weight_decay=0.01)
    w.grad = torch.tensor([1.0, float("nan"), 1.0])
    with pytest.raises(optim.cli.NonFinite, match="gradient norm nan"):
        opt.step(1.0)
    assert torch.equal(w.detach(), torch.ones(3)) and w.grad is None


def _reduce(rank, world, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.bfloat16))
    w.grad = torch.tensor([1.0 if rank == 1 else 2.0 ** -8], dtype=torch.bfloat16)
    optim.all_reduce_grads([w], world)
    results[rank] = w.grad.float().item()
    dist.destroy_process_group()


def test_bf16_gradients_are_summed_in_fp32_across_ranks():
    """2^-8, 1 and 2^-8 on ranks 0, 1, 2: gloo's bf16 all-reduce gives 1.0 (a partial sum 1 + 2^-8 rounds back to 1,
    measured); in fp32 the sum is 1 + 2^-7, which bf16 holds exactly."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_reduce, args=(3, port, results), nprocs=3)
    assert dict(results) == {0: 1 + 2 ** -7, 1: 1 + 2 ** -7, 2: 1 + 2 ** -7}


@pytest.mark.parametrize("script", ["sft", "opcd"])
def test_a_disk_that_fills_up_during_a_save_is_one_line_and_leaves_no_partial_checkpoint(script, tiny_model, make_data,
                                                                                        tmp_path):
    """The file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes every write past 256 KiB fail with an OSError, as a
    full disk does: the tiny model's checkpoint (3 MB) cannot be written."""
    import resource
    import signal
    import subprocess
    import sys

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    data = make_data("train", 2, tasks=["frozenlake"], kinds=("planning",))
    out = tmp_path / "run"
    argv = {"sft": ["sft.py", "--model", tiny_model, "--data", data, "--out", out, "--batch-size", 2,
                    "--micro-batch-size", 2, "--full", "--max-steps", 1, "--kinds", "planning"],
            "opcd": ["opcd.py", "--model", tiny_model, "--teacher", tiny_model, "--data", data, "--out", out,
                     "--rollout", "hf", "--batch-size", 2, "--max-new-tokens", 6, "--max-steps", 1]}[script]
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, preexec_fn=small_disk)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and "File too large" in errors[0], errors
    assert not list(out.glob(".*.tmp-*")) and not (out / "model").exists() and not (out / "last").exists()


def test_a_disk_that_fills_up_during_an_evaluation_is_one_line(make_data, tmp_path):
    """The same file-size limit, at 8 KiB: episodes.jsonl outgrows it; evaluate.py stops in one line, exit 2."""
    import resource
    import signal
    import subprocess
    import sys

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 10, 8 << 10))

    data = make_data("test", 2, kinds=("planning",))
    result = subprocess.run([sys.executable, "evaluate.py", "--model", "oracle", "--backend", "oracle", "--data", data,
                             "--condition", "both", "--out", str(tmp_path / "eval")],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, preexec_fn=small_disk)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(errors) == 1 and "File too large" in errors[0], errors
