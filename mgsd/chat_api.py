"""The project's HTTP clients, standard library only, no redirect ever followed, every request retried with
exponential back-off:
  evaluate.py --backend openai   any /v1/chat/completions endpoint; pictures sent as PNG data URLs, --concurrency
                                 requests in flight. A request that still fails is returned as an error (the episode
                                 counts as a failure); an endpoint that can serve nothing (unreachable, 401/403/404,
                                 a redirect) raises EndpointError, which stops the run.
  opcd.py --teacher-url          a vLLM server's /v1/completions with its prompt_logprobs extension: the teacher's
                                 log-prob of every token of a token-id sequence, and its top-k (ServedTeacher)."""
import base64
import http.client
import io
import json
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


class EndpointError(Exception):
    """The endpoint cannot serve any request (unreachable, wrong key, wrong path, a redirect): stop the run."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx is not followed: it would carry the key to another host and turn the POST into a GET."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError for the 3xx


def opener(proxy_from_env=True):
    """urllib's opener without redirects: through $http_proxy / $https_proxy as they are set now (no_proxy
    honoured), or never through a proxy."""
    return urllib.request.build_opener(_NoRedirect, *([] if proxy_from_env else [urllib.request.ProxyHandler({})]))


def read_json(request, timeout, proxy_from_env=True):
    """POST `request` and read its JSON answer against a wall-clock deadline of `timeout` seconds (a server that
    trickles its bytes is cut off: the deadline is checked between reads, so a request ends within 2 x timeout)."""
    deadline = time.monotonic() + timeout
    with opener(proxy_from_env).open(request, timeout=timeout) as resp:
        chunks = []
        while chunk := resp.read1(1 << 16):
            chunks.append(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no whole answer within {timeout:g} s")
    return json.loads(b"".join(chunks))


def run_concurrently(fn, items, workers):
    """Yield (index, fn(item)) as each finishes, from `workers` daemon threads: Ctrl-C in the caller ends the process
    at once, not after the requests in flight and the back-off sleeps; an exception of fn is raised here."""
    jobs, done = queue.Queue(), queue.Queue()
    for job in enumerate(items):
        jobs.put(job)

    def work():
        while True:
            try:
                i, item = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((i, fn(item), None))
            except Exception as e:  # noqa: BLE001  handed to the caller's thread
                done.put((i, None, e))

    for _ in range(max(1, min(workers, len(items)))):
        threading.Thread(target=work, daemon=True).start()
    for _ in range(len(items)):
        i, result, error = done.get()
        if error is not None:
            raise error
        yield i, result


def logprob(value):
    """A served log-prob as a float: a finite number <= 0 (a JSON number, never a string such as "nan")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value <= 0 or value == float("-inf"):
        raise ValueError(f"log-prob {value!r}")
    return float(value)


def png_data_url(image):
    from PIL import Image
    if isinstance(image, (str, Path)) and str(image).lower().endswith(".png"):
        data = Path(image).read_bytes()
    else:
        buf = io.BytesIO()
        (Image.open(image) if isinstance(image, (str, Path)) else image).convert("RGB").save(buf, format="PNG")
        data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def openai_messages(messages):
    out = []
    for m in messages:
        if not isinstance(m["content"], list):
            out.append({"role": m["role"], "content": m["content"]})
            continue
        parts = []
        for part in m["content"]:
            if part["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": png_data_url(part["image"])}})
            else:
                parts.append({"type": "text", "text": part["text"]})
        out.append({"role": m["role"], "content": parts})
    return out


def chat_completion(args, api_key, messages):
    """One request with retries. -> (text, None) or (None, error message); raises EndpointError."""
    url = args.base_url.rstrip("/") + "/chat/completions"
    body = json.dumps({"model": args.model, "messages": openai_messages(messages), "n": 1,
                       "temperature": 0.0, "max_tokens": args.max_new_tokens}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    error, unreachable = None, False
    for attempt in range(args.retries + 1):
        if attempt:
            time.sleep(min(60.0, args.backoff_seconds * 2 ** (attempt - 1)))
        try:
            request = urllib.request.Request(url, data=body, headers=headers, method="POST")
            # the key goes to --base-url only: no proxy sees it unless --proxy-from-env
            content = read_json(request, args.timeout_seconds, args.proxy_from_env or not api_key)["choices"][0]["message"]["content"]
            if not isinstance(content, str):
                return None, "response without text content" if content is None else \
                    f"content is a {type(content).__name__}, not text"
            return content, None
        except urllib.error.HTTPError as e:
            error, unreachable = f"HTTP {e.code} {e.reason}", False
            if e.code in (401, 403, 404) or 300 <= e.code < 400:  # every request would get the same answer
                raise EndpointError(f"{url}: {error}" + (" (redirects are not followed)" if e.code < 400 else "")) from None
            if e.code != 429 and e.code < 500:
                return None, error  # this request is rejected (e.g. too long); retrying will not help
        except urllib.error.URLError as e:  # raised before any byte was sent
            timeout = isinstance(e.reason, TimeoutError)
            error, unreachable = ("timeout" if timeout else f"cannot reach {url}: {e.reason}"), not timeout
        except (TimeoutError, http.client.HTTPException, ConnectionError) as e:
            error, unreachable = ("timeout" if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}"), False
        except (ValueError, KeyError, IndexError, TypeError, RecursionError) as e:
            error, unreachable = f"malformed response: {type(e).__name__}", False
    if unreachable:
        raise EndpointError(f"{error} (after {args.retries + 1} attempts)")
    return None, error


def openai_backend(args, episodes):
    api_key = os.environ.get(args.api_key_env)
    print(f"openai: {args.base_url}, key {'from $' + args.api_key_env if api_key else 'not set'}, "
          f"{args.concurrency} concurrent requests", flush=True)
    def run(emit):
        for i, (text, error) in run_concurrently(lambda ep: chat_completion(args, api_key, ep["messages"]), episodes,
                                                 args.concurrency):
            emit(i, text, error)
    return run


class ServedTeacher:
    """The frozen teacher behind a vLLM OpenAI-compatible server (`vllm serve MODEL --max-logprobs K`).
    score() sends token ids, never text: the privileged prompt followed by the student's exact response ids,
    and reads back the teacher's log-prob of each response token and its top-k at each position (vLLM's prompt
    log-probs are those of the raw logits: temperature 1). All sequences of a call are in flight at once."""

    def __init__(self, base_url, model, timeout_seconds=600.0, retries=4, backoff_seconds=1.0, concurrency=64,
                 vocab_size=None):
        self.url, self.model = base_url.rstrip("/").removesuffix("/v1"), model  # the server's root
        self.timeout, self.retries, self.backoff, self.concurrency = timeout_seconds, retries, backoff_seconds, concurrency
        self.vocab_size = vocab_size  # the student's: every token id the server returns must lie below it

    def post(self, path, payload):
        """One JSON POST to the server's `path` (/tokenize, /v1/completions) with retries (connection errors, 429,
        5xx); raises EndpointError once they are spent, or at once for an answer that a retry cannot change (4xx, a
        redirect, a malformed body)."""
        body, error = json.dumps(payload).encode(), None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(60.0, self.backoff * 2 ** (attempt - 1)))
            try:
                request = urllib.request.Request(self.url + path, data=body, method="POST",
                                                 headers={"Content-Type": "application/json"})
                return read_json(request, self.timeout)
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace").replace("\n", " ") if e.code < 500 else ""
                error = f"HTTP {e.code} {e.reason}" + (f": {detail}" if detail else "")
                if e.code != 429 and e.code < 500:
                    raise EndpointError(f"{self.url}{path}: {error}") from None
            except urllib.error.URLError as e:
                error = f"cannot reach {self.url}: {e.reason}"
            except (TimeoutError, http.client.HTTPException, ConnectionError) as e:
                error = f"{type(e).__name__}: {e}"
            except (ValueError, RecursionError) as e:  # not JSON, or JSON nested too deep to read
                raise EndpointError(f"{self.url}{path}: malformed answer ({type(e).__name__})") from None
        raise EndpointError(f"the teacher at {self.url}: {error} (after {self.retries + 1} attempts)")

    def check_tokenizer(self, tokenizer, probes):
        """Refuse a server whose model tokenizes the probe texts otherwise than the student's tokenizer."""
        for text in probes:
            served = self.post("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
            if not isinstance(served, dict) or served.get("tokens") != tokenizer(text, add_special_tokens=False)["input_ids"]:
                raise EndpointError(f"the teacher at {self.url} ({self.model}) tokenizes text otherwise than the student")

    def score(self, sequences, starts, topk=0):
        """For each token-id sequence, from position starts[i] on: (the log-prob of each token, [{token id:
        log-prob} of the teacher's top-k at each position]) (empty dicts for topk 0). Every answer is checked before
        it is used: one log-prob per token, each finite and <= 0, exactly `topk` top entries a position with ids
        of the student's vocabulary; anything else is an EndpointError (the step is not taken)."""
        def one(ids, start):
            answer = self.post("/v1/completions", {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 1.0,
                                                "prompt_logprobs": topk})
            try:
                positions = answer["choices"][0]["prompt_logprobs"][start:]
                picked = [logprob(pos[str(t)]["logprob"]) for pos, t in zip(positions, ids[start:])]
                tops = [{int(k): logprob(v["logprob"]) for k, v in pos.items() if v["rank"] <= topk} for pos in positions]
            except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
                raise EndpointError(f"the teacher at {self.url}: no valid prompt log-probs in its answer "
                                    f"({type(e).__name__}: {str(e)[:80]})") from None
            if len(picked) != len(ids) - start:
                raise EndpointError(f"the teacher at {self.url}: {len(picked)} prompt log-probs for {len(ids) - start} tokens")
            want = min(topk, self.vocab_size or topk)
            for top in tops if topk else []:
                if len(top) != want or not all(0 <= t < (self.vocab_size or t + 1) for t in top):
                    raise EndpointError(f"the teacher at {self.url}: {len(top)} top log-probs (ids {sorted(top)[:3]}...) "
                                        f"where {want} ids below {self.vocab_size} were asked for")
            return picked, tops

        scored = [None] * len(sequences)
        for i, result in run_concurrently(lambda job: one(*job), list(zip(sequences, starts)), self.concurrency):
            scored[i] = result
        return scored
