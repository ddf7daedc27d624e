"""evaluate.py: backends, scoring through the one simulator, error accounting, resume, report, CLI errors.

The openai backend is exercised against real HTTP servers started here (http.server in a thread):
one serves the tiny model, others answer from the data (reference or another instance's plan) and
inject HTTP 500s and delays."""
import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import envs
import evaluate
from mgsd import chat_api, splits

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@pytest.fixture(scope="session")
def data(make_data):
    return make_data("test", 2, kinds=("planning", "perception"))


class Server:
    """A real /v1/chat/completions server; answer(payload) -> (status, content, delay_seconds)."""

    def __init__(self, answer):
        self.requests = []  # (headers, payload) of every request received
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((dict(self.headers), payload))
                status, content, delay = answer(payload) if self.path == "/v1/chat/completions" else (404, None, 0)
                time.sleep(delay)
                body = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": content}}]}
                                  if status == 200 else {"error": {"message": "injected"}}).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the client gave up (timeout) and closed the socket
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def prompt_index(data_dir, conditions=("image", "text")):
    """Request body messages (as the client sends them) -> (row, condition)."""
    rows = splits.load_split(data_dir, kinds=["planning"])
    index = {}
    for ep in evaluate.build_episodes(rows, "planning", conditions):
        index[json.dumps(chat_api.openai_messages(ep["messages"]))] = (ep["row"], ep["condition"])
    return rows, index


def run(*argv):
    return evaluate.main([str(a) for a in argv])


def read_episodes(out):
    return [json.loads(line) for line in (Path(out) / "episodes.jsonl").read_text().splitlines()]


def test_oracle_scores_100_percent_success_and_optimal_on_every_task(data, tmp_path):
    summary = run("--model", "oracle", "--data", data, "--backend", "oracle", "--condition", "both", "--out", tmp_path)
    rows = splits.load_split(data, kinds=["planning"])
    assert {r["task"] for r in rows} == set(envs.TASKS)
    for condition in ("image", "text"):
        agg = summary["conditions"][condition]
        assert agg["n"] == len(rows) and agg["errors"] == 0
        for task in envs.TASKS:
            for metric in ("success", "optimal", "parse_ok"):
                assert agg["per_task"][task][metric] == 1.0
            assert agg["per_task"][task]["illegal"] == 0.0
        assert agg["macro"]["success"] == agg["macro"]["optimal"] == 1.0
    assert summary["gap_text_minus_image"]["macro"]["success"] == 0.0
    episodes = read_episodes(tmp_path)
    plans = {r["id"]: r["plan"] for r in rows}
    assert len(episodes) == 2 * len(rows)
    assert all(ep["plan"] == plans[ep["id"]] for ep in episodes)


def test_image_prompt_direct_asks_the_picture_for_the_plan_alone_and_text_stays(data):
    """--image-prompt direct: the answer-only instructions the planning-direct rows train on, for the image
    condition; the text condition keeps the text-student prompt that every model rehearses."""
    rows = splits.load_split(data, kinds=["planning"])[:3]
    recap = evaluate.build_episodes(rows, "planning", ["image", "text"])
    direct = evaluate.build_episodes(rows, "planning", ["image", "text"], direct=True)
    for a, b, row in zip(recap[::2], direct[::2], rows):
        assert b["messages"] == envs.student_messages(row["state"], row["image"], direct=True) != a["messages"]
        assert "Do not restate the map" in b["messages"][0]["content"][0]["text"]
    assert [e["messages"] for e in recap[1::2]] == [e["messages"] for e in direct[1::2]]
    proc = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", "oracle", "--backend", "oracle", "--data",
                           data, "--kind", "perception", "--image-prompt", "direct"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr == "error: --image-prompt applies to planning only\n"


@pytest.mark.parametrize("kind", ["perception", "dynamics"])
def test_oracle_scores_100_percent_on_every_perception_and_dynamics_question(kind, make_data, tmp_path):
    data = make_data("test", 2, kinds=("planning", "perception", "dynamics"))
    summary = run("--model", "oracle", "--data", data, "--backend", "oracle", "--kind", kind, "--out", tmp_path)
    agg = summary["conditions"]["image"]
    assert agg["n"] == len(splits.load_split(data, kinds=[kind])) > 0
    for task in envs.TASKS:
        cell = agg["per_task"][task]
        questions = [k for k in cell if k not in ("n", "errors")]
        assert ("all_correct" in questions and len(questions) >= 3) if kind == "perception" else questions == ["correct"]
        assert all(cell[q] == 1.0 for q in questions)


def test_report_and_plot_are_written_and_hold_the_numbers(data, tmp_path):
    run("--model", "oracle", "--data", data, "--backend", "oracle", "--condition", "both", "--out", tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "condition: image" in report and "condition: text" in report and "modality gap" in report
    macro_lines = [line for line in report.splitlines() if line.startswith("| macro")]
    assert len(macro_lines) == 3 and "100.0" in macro_lines[0] and "+0.0" in macro_lines[2]
    png = (tmp_path / "success.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["conditions"]["image"]["macro"]["success"] == 1.0


def test_another_instances_plan_is_scored_exactly_as_the_simulator_says(data, tmp_path):
    rows, index = prompt_index(data)
    by_task = {t: [r for r in rows if r["task"] == t] for t in envs.TASKS}
    def other(row):  # the next instance of the same task (another level when the level has one instance)
        same = by_task[row["task"]]
        return same[(same.index(row) + 1) % len(same)]
    def answer(payload):
        row, _ = index[json.dumps(payload["messages"])]
        plan = other(row)["plan"]
        sep = "," if row["task"] == "minibehaviour" else ""
        return 200, f"I will move.\n<answer>{sep.join(plan)}</answer>", 0
    with Server(answer) as server:
        summary = run("--model", "m", "--data", data, "--backend", "openai", "--base-url", server.url,
                      "--condition", "both", "--out", tmp_path)
    episodes = read_episodes(tmp_path)
    assert len(episodes) == 2 * len(rows)
    row_by_id = {r["id"]: r for r in rows}
    expected = {c: {t: [] for t in envs.TASKS} for c in ("image", "text")}
    for ep in episodes:
        row = row_by_id[ep["id"]]
        plan = other(row)["plan"]
        sim = envs.simulate(row["state"], plan)
        assert ep["plan"] == plan and ep["metrics"]["parse_ok"] is True
        assert ep["metrics"]["success"] == sim["success"]
        assert ep["metrics"]["illegal"] == sim["illegal"]
        assert ep["metrics"]["optimal"] == (sim["success"] and len(plan) == len(row["plan"]))
        expected[ep["condition"]][ep["task"]].append(sim["success"])
    for condition, tasks in expected.items():
        for task, successes in tasks.items():
            assert summary["conditions"][condition]["per_task"][task]["success"] == pytest.approx(
                sum(successes) / len(successes))
    assert 0 < summary["conditions"]["image"]["macro"]["success"] < 1  # not a degenerate check


def test_openai_backend_over_http_matches_hf_backend_on_the_tiny_model(tiny_model, data, tmp_path, monkeypatch):
    from PIL import Image
    from mgsd import common

    model, processor = common.load_model(tiny_model, "cpu")
    lock = threading.Lock()
    def answer(payload):  # the server: decode the PNG data URL, run the model greedily
        messages = []
        for m in payload["messages"]:
            parts = []
            for p in m["content"]:
                if p["type"] == "image_url":
                    head, b64 = p["image_url"]["url"].split(",", 1)
                    assert head == "data:image/png;base64"
                    parts.append({"type": "image", "image": Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")})
                else:
                    parts.append({"type": "text", "text": p["text"]})
            messages.append({"role": m["role"], "content": parts})
        with lock:
            [text] = [o["text"] for o in common.generate_responses(model, processor, [messages], payload["max_tokens"])]
        return 200, text, 0
    monkeypatch.setenv("MGSD_TEST_KEY", "sk-test-secret-123")
    common_args = ["--model", tiny_model, "--data", data, "--condition", "both", "--limit", 4, "--max-new-tokens", 12]
    with Server(answer) as server:
        run(*common_args, "--backend", "openai", "--base-url", server.url, "--api-key-env", "MGSD_TEST_KEY",
            "--concurrency", 3, "--out", tmp_path / "openai")
    run(*common_args, "--backend", "hf", "--batch-size", 1, "--out", tmp_path / "hf")
    served, local = read_episodes(tmp_path / "openai"), read_episodes(tmp_path / "hf")
    assert len(server.requests) == len(served) == len(local) == 8
    assert [e["response"] for e in served] == [e["response"] for e in local]
    assert any(e["response"] for e in local) and not any(e["error"] for e in served)
    assert all(h["Authorization"] == "Bearer sk-test-secret-123" for h, _ in server.requests)
    for f in (tmp_path / "openai").iterdir():  # the key is never written
        assert b"sk-test-secret-123" not in f.read_bytes()


def test_openai_errors_count_as_failures_and_resume_fills_only_missing_episodes(data, tmp_path):
    rows, index = prompt_index(data)
    ids = [r["id"] for r in rows]
    failing, slow, flaky = {ids[0], ids[5]}, {ids[3]}, {ids[7]}  # 500 always, too slow, 500 once
    seen = []
    def faulty(payload):
        row, condition = index[json.dumps(payload["messages"])]
        seen.append((row["id"], condition))
        if row["id"] in failing or (row["id"] in flaky and seen.count((row["id"], condition)) == 1):
            return 500, None, 0
        return 200, envs.reference_response(row["state"]), 1.5 if row["id"] in slow else 0
    args = ["--model", "m", "--data", data, "--backend", "openai", "--condition", "both", "--retries", 1,
            "--backoff-seconds", 0.05, "--timeout-seconds", 0.5, "--concurrency", 4, "--out", tmp_path,
            "--max-error-share", 1]  # errors are the point here
    with Server(faulty) as server:
        summary = run(*args, "--base-url", server.url)
    n, bad = len(rows), failing | slow
    for condition in ("image", "text"):
        agg = summary["conditions"][condition]
        assert agg["n"] == n and agg["errors"] == len(bad)  # errored episodes stay in the denominator
        mean_success = sum(cell["success"] * cell["n"] for cell in agg["per_task"].values()) / n
        assert mean_success == pytest.approx((n - len(bad)) / n)
        assert sum(cell["errors"] for cell in agg["per_task"].values()) == len(bad)
    episodes = read_episodes(tmp_path)
    errored = {e["id"] for e in episodes if e["error"]}
    assert errored == bad
    assert all(e["response"] is None and not any(e["metrics"].values()) for e in episodes if e["error"])
    assert all(e["metrics"]["success"] for e in episodes if not e["error"])  # the flaky one succeeded on retry
    assert seen.count((ids[0], "image")) == 2  # first attempt + one retry

    def healthy(payload):
        row, condition = index[json.dumps(payload["messages"])]
        return 200, envs.reference_response(row["state"]), 0
    with Server(healthy) as server:  # resume after errors: only the errored episodes are requested again
        summary = run(*args, "--base-url", server.url, "--resume")
        requested = sorted(index[json.dumps(p["messages"])][0]["id"] for _, p in server.requests)
    assert requested == sorted(list(bad) * 2)
    assert summary["conditions"]["image"]["macro"]["success"] == summary["conditions"]["text"]["macro"]["success"] == 1.0
    assert summary["conditions"]["image"]["errors"] == 0

    lines = (tmp_path / "episodes.jsonl").read_text().splitlines()  # resume after a crash: a torn last line
    (tmp_path / "episodes.jsonl").write_text("\n".join(lines[:10]) + "\n" + lines[10][:25])
    with Server(healthy) as server:
        summary = run(*args, "--base-url", server.url, "--resume")
        assert len(server.requests) == 2 * n - 10
    assert [json.loads(line) for line in lines[:10]] == read_episodes(tmp_path)[:10]
    assert len(read_episodes(tmp_path)) == 2 * n and summary["conditions"]["text"]["errors"] == 0
    with pytest.raises(SystemExit) as exit_info:  # resuming a run made with other settings is refused
        run(*args, "--base-url", "http://127.0.0.1:1/v1", "--resume", "--max-new-tokens", 7)
    assert exit_info.value.code == 2 and len(read_episodes(tmp_path)) == 2 * n
    for other in (["--backend", "oracle"], ["--condition", "image"]):  # a summary must not mix two settings
        with pytest.raises(SystemExit) as exit_info:
            run(*args, *other, "--base-url", "http://127.0.0.1:1/v1", "--resume")  # the last --backend / --condition counts
        assert exit_info.value.code == 2 and len(read_episodes(tmp_path)) == 2 * n


@pytest.mark.parametrize("kind", ["planning", "dynamics"])  # dynamics: inverse rows carry two images
def test_hf_and_vllm_give_identical_greedy_outputs_on_the_tiny_model(tiny_model, data, make_data, kind, tmp_path):
    split = data if kind == "planning" else make_data("test", 2, tasks=["maze"], levels=[3], kinds=("dynamics",))
    common_args = ["--model", tiny_model, "--data", split, "--kind", kind, "--max-new-tokens", 16]
    common_args += ["--condition", "both", "--limit", 6] if kind == "planning" else []
    run(*common_args, "--backend", "hf", "--out", tmp_path / "hf")
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TORCH_COMPILE_DISABLE="1")
    proc = subprocess.run([PY, str(ROOT / "evaluate.py"), *map(str, common_args), "--backend", "vllm",
                           "--out", str(tmp_path / "vllm")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf, vllm = read_episodes(tmp_path / "hf"), read_episodes(tmp_path / "vllm")
    assert len(hf) == len(vllm) == (12 if kind == "planning" else 6)
    if kind == "dynamics":
        assert sum("inverse" in e["id"] for e in hf) == 2
    assert [e["response"] for e in hf] == [e["response"] for e in vllm]
    assert sum(len(e["response"]) for e in hf) > 0


def test_a_run_where_most_episodes_errored_exits_1_after_writing_its_results(data, tmp_path, capsys):
    """A server that fails every request: the episodes count as failures and are written, but the
    exit code says the run is not to be trusted (it used to exit 0)."""
    with Server(lambda payload: (500, None, 0)) as server:
        with pytest.raises(SystemExit) as exit_info:
            run("--model", "m", "--data", data, "--backend", "openai", "--base-url", server.url, "--retries", 0,
                "--out", tmp_path)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    n = len(splits.load_split(data, kinds=["planning"]))
    assert err == [f"error: {n} of {n} episodes errored (more than --max-error-share 0.1); they count as failures above"]
    assert json.loads((tmp_path / "summary.json").read_text())["conditions"]["image"]["errors"] == n


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unknown_backend", "no_data_jsonl", "unreachable_endpoint", "rejected_key", "missing_model"])
def test_bad_input_gives_one_line_error_and_exit_code_2(case, data, tmp_path):
    with Server(lambda payload: (401, None, 0)) as server:
        argv = {"unknown_backend": ["--model", "m", "--data", data, "--backend", "tgi"],
                "no_data_jsonl": ["--model", "m", "--data", tmp_path, "--backend", "oracle"],
                "unreachable_endpoint": ["--model", "m", "--data", data, "--backend", "openai", "--retries", 0,
                                         "--base-url", f"http://127.0.0.1:{free_port()}/v1"],
                "rejected_key": ["--model", "m", "--data", data, "--backend", "openai", "--base-url", server.url],
                "missing_model": ["--model", tmp_path / "no-model", "--data", data, "--backend", "hf"]}[case]
        proc = subprocess.run([PY, str(ROOT / "evaluate.py"), *map(str, argv), "--out", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0]
    expected = {"unknown_backend": "tgi", "no_data_jsonl": "data.jsonl", "unreachable_endpoint": "cannot reach",
                "rejected_key": "HTTP 401", "missing_model": "no-model"}[case]
    assert expected in lines[0]
    if case in ("missing_model", "unreachable_endpoint", "rejected_key"):  # nothing written: a corrected rerun just runs
        assert not (tmp_path / "out").exists()
    if case == "rejected_key":  # stopped at once: no retries of a request that cannot succeed
        assert len(server.requests) <= 2 * 8  # at most the requests already in flight (--concurrency 8)


def test_a_redirect_is_not_followed_and_the_key_goes_nowhere_else(data, tmp_path, monkeypatch):
    """An endpoint answering 302 to another port used to get the key sent there (and a body-less GET scored)."""
    with Server(lambda payload: (200, "unused", 0)) as elsewhere:
        class Redirect(BaseHTTPRequestHandler):
            def do_POST(self):
                self.send_response(302)
                self.send_header("Location", elsewhere.url + "/chat/completions")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        monkeypatch.setenv("MGSD_TEST_KEY", "sk-secret-123")
        try:
            with pytest.raises(SystemExit) as exit_info:
                run("--model", "m", "--data", data, "--backend", "openai", "--retries", 0, "--api-key-env", "MGSD_TEST_KEY",
                    "--base-url", f"http://127.0.0.1:{httpd.server_address[1]}/v1", "--out", tmp_path / "out")
        finally:
            httpd.shutdown()
            httpd.server_close()
    assert exit_info.value.code == 2 and elsewhere.requests == []


def test_a_key_in_the_base_url_is_refused_without_being_echoed(data, tmp_path):
    proc = subprocess.run([PY, str(ROOT / "evaluate.py"), "--model", "m", "--data", str(data), "--backend", "openai",
                           "--base-url", "http://127.0.0.1:1/v1?api_key=sk-secret-123", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "sk-secret-123" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


def test_ctrl_c_is_one_line_and_keeps_the_finished_episodes(data, tmp_path):
    """Ctrl-C used to print a traceback; now one line, exit 130, and --resume can continue."""
    import signal

    with Server(lambda payload: (200, "<answer>R</answer>", 0.3)) as server:
        proc = subprocess.Popen([PY, str(ROOT / "evaluate.py"), "--model", "m", "--data", str(data), "--backend", "openai",
                                 "--base-url", server.url, "--concurrency", "1", "--out", str(tmp_path / "out")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                # a shell starts background jobs with SIGINT ignored, and Python then keeps
                                # ignoring it: give the child the default, as a terminal's foreground job has
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 60
        while time.time() < deadline and not (tmp_path / "out" / "episodes.jsonl").is_file():
            time.sleep(0.1)
        time.sleep(1.0)  # a few episodes finish
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["error: interrupted; finished episodes are kept in episodes.jsonl "
                                        "(--resume continues)"]
    assert len(read_episodes(tmp_path / "out")) >= 1


def test_ctrl_c_during_a_slow_request_or_a_back_off_ends_within_seconds(data, tmp_path):
    """Ctrl-C used to wait for the requests in flight (27 s here) or for a back-off sleep (never, at 1e6 s)."""
    import signal

    for answer, extra in (((200, "<answer>R</answer>", 60), []), ((500, None, 0), ["--backoff-seconds", "600"])):
        with Server(lambda payload: answer) as server:
            proc = subprocess.Popen([PY, str(ROOT / "evaluate.py"), "--model", "m", "--data", str(data), "--backend",
                                     "openai", "--base-url", server.url, "--concurrency", "2", *extra, "--out",
                                     str(tmp_path / f"out{len(extra)}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            deadline = time.time() + 60
            while time.time() < deadline and not server.requests:
                time.sleep(0.1)
            time.sleep(0.5)
            interrupted = time.time()
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=60)
            assert time.time() - interrupted < 3 and proc.returncode == 130, err
            assert err.strip().splitlines()[-1].startswith("error: interrupted")


def test_a_server_that_trickles_its_answer_is_cut_off_at_the_request_deadline(data, tmp_path):
    """--timeout-seconds is a wall-clock deadline per request, not per read (a byte every 0.2 s took 23 s)."""
    class Trickle(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100):
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    start = time.time()
    try:
        summary = run("--model", "m", "--data", data, "--backend", "openai", "--base-url",
                      f"http://127.0.0.1:{httpd.server_address[1]}/v1", "--timeout-seconds", 1, "--retries", 0,
                      "--limit", 2, "--concurrency", 2, "--out", tmp_path / "out", "--max-error-share", 1)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert time.time() - start < 10
    assert summary["conditions"]["image"]["errors"] == 2
