"""Evaluate a vision-language model on visual planning, perception and the modality gap (docs/method.md §9).

Kinds: planning from the task picture (condition `image`) or the same state as text (`text`; `both` also
reports text − image, the gap MGSD aims to close), scored by splits.score_row, the parser and simulator that
training uses; perception (numbered questions about one picture); dynamics; vision (generic grids, mgsd/grids.py).
Greedy, one sample, vision special tokens never generated. Backends: hf, vllm, openai (any OpenAI-compatible
endpoint, mgsd/chat_api.py; the key is read from the variable --api-key-env names and never written) and oracle
(the reference answers: the 100 % upper bound). A request that fails after its retries counts as a failure;
an endpoint that serves nothing stops the run (exit 2). Episodes are appended to OUT/episodes.jsonl as they
finish (--resume asks only for the missing ones); OUT also gets summary.json, report.md and a plot.
Commands: README.md, "Evaluation".
"""
import json
import os
import re
import sys
import time
import urllib.parse
from pathlib import Path

import envs
from mgsd import chat_api, cli, gallery, splits

BACKENDS = ("hf", "vllm", "openai", "oracle")
PLANNING_METRICS = ("success", "optimal", "parse_ok", "illegal")


def get_parser():
    p = cli.Parser(prog="evaluate.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (model name for --backend openai)")
    p.add_argument("--data", required=True, help="split directory holding data.jsonl (python envs.py data ...)")
    p.add_argument("--backend", default="hf", choices=BACKENDS, help="how responses are produced")
    p.add_argument("--condition", default="image", choices=("image", "text", "both"),
                   help="planning input: the image, the text state, or both (then the gap text - image is reported)")
    p.add_argument("--kind", default="planning", choices=("planning", "perception", "dynamics", "vision"),
                   help="which rows to evaluate (vision: the generic grids of mgsd/grids.py)")
    p.add_argument("--image-prompt", default="recap", choices=("recap", "direct"),
                   help="planning from the image: recap, the instructions of the method (recap, route, plan); direct, the "
                        "answer-only instructions of the paper's direct-SFT baseline (models trained on planning-direct rows)")
    p.add_argument("--max-new-tokens", type=cli.positive_int, default=4096, help="greedy decoding budget per response")
    p.add_argument("--out", default=None, help="output directory (default runs/eval/<the model path, / as _>-<backend>-<kind>)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8, help="hf: prompts per generate call")
    p.add_argument("--max-model-len", type=cli.positive_int, default=None, help="vllm: context length (default: longest prompt + max-new-tokens)")
    p.add_argument("--base-url", default=None, help="openai: endpoint base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="openai: name of the environment variable holding the key")
    p.add_argument("--concurrency", type=cli.positive_int, default=8, help="openai: requests in flight")
    p.add_argument("--proxy-from-env", action="store_true",
                   help="openai: send requests that carry the key through $http_proxy / $https_proxy (default: direct)")
    p.add_argument("--timeout-seconds", type=cli.timeout_seconds, default=600.0, help="openai: per-request timeout")
    p.add_argument("--retries", type=cli.nonneg_int, default=3, help="openai: retries per request after the first attempt")
    p.add_argument("--backoff-seconds", type=cli.backoff_seconds, default=2.0,
                   help="openai: first retry delay, doubled on each retry (at most 60 s a wait), <= 600")
    p.add_argument("--resume", action="store_true", help="keep finished episodes of OUT/episodes.jsonl, request only the rest")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that already holds a run")
    p.add_argument("--limit", type=cli.positive_int, default=None,
                   help="evaluate at most N instances, round-robin over (task, level) (default: all)")
    p.add_argument("--max-error-share", type=cli.nonneg_float, default=0.1,
                   help="exit with code 1 when more than this share of episodes errored (results are still written)")
    return p


# ----------------------------------------------------------------------------- episodes

def limit_round_robin(rows, limit):
    """The first `limit` rows in the order: instance i of every (task, level), tasks interleaved."""
    rank, level_rank, tasks = {}, {}, sorted({r["task"] for r in rows})
    order = []
    for row in rows:
        cell = (row["task"], row["level"])
        i = rank[cell] = rank.get(cell, -1) + 1
        j = level_rank.setdefault(cell, sum(c[0] == row["task"] for c in level_rank))
        order.append(((i, j, tasks.index(row["task"])), row))
    return [row for _, row in sorted(order, key=lambda x: x[0])[:limit]]


def build_episodes(rows, kind, conditions, direct=False):
    episodes = []
    for row in rows:
        for condition in conditions:
            if kind == "planning":
                turn = (envs.student_messages(row["state"], row["image"], direct) if condition == "image"  # a chat
                        else envs.text_student_messages(row["state"]))
            elif kind == "perception":
                turn = envs.perception_messages(row["state"], row["image"])
            else:  # dynamics and vision rows carry their own prompt; drop the assistant target
                turn = [m for m in row["messages"] if m["role"] != "assistant"]
            episodes.append({"row": row, "condition": condition, "messages": turn})
    return episodes


def score_episode(ep, response, error):
    row = ep["row"]
    scores = splits.score_row(row, None if error else response)
    plan = scores.pop("plan", None)
    metrics = {k: v for k, v in scores.items() if isinstance(v, (bool, int, float))}
    return {"id": row["id"], "task": row["task"], "level": row["level"], "seed": row.get("seed"),
            "kind": row["kind"], "condition": ep["condition"], "response": response, "plan": plan,
            "metrics": metrics, "error": error is not None, "error_message": error}


def key(record):
    return record["id"], record["condition"]


# ----------------------------------------------------------------------------- backends
# A backend factory loads what it needs (timed as load_seconds) and returns run(emit), which
# produces one response per episode and calls emit(index, response, error_message) as they come.

def oracle_backend(args, episodes):
    def run(emit):
        for i, ep in enumerate(episodes):
            emit(i, ep["row"]["answer"], None)  # the row's reference answer
    return run


def hf_backend(args, episodes):
    """Batched greedy `generate` (common.generate_responses: left padding, vision tokens forbidden)."""
    import torch
    from mgsd.common import generate_responses, load_model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, processor = load_model(args.model, device, dtype=torch.bfloat16 if device == "cuda" else None)
    def run(emit):
        for start in range(0, len(episodes), args.batch_size):
            chunk = [ep["messages"] for ep in episodes[start:start + args.batch_size]]
            for j, out in enumerate(generate_responses(model, processor, chunk, args.max_new_tokens)):
                emit(start + j, out["text"], None)
    return run


def vllm_backend(args, episodes):
    """The vLLM engine of common.make_llm (in-process), greedy, vision tokens never sampled."""
    import torch
    from transformers import AutoProcessor
    from mgsd.common import make_llm, message_images, vllm_generate
    processor = AutoProcessor.from_pretrained(args.model)
    messages = [ep["messages"] for ep in episodes]
    n_images = [sum(c.get("type") == "image" for m in chat if isinstance(m["content"], list) for c in m["content"])
                for chat in messages]  # counted, not loaded: vllm_generate loads them
    tokens_per_image = 0  # all images of a split have one size (method.md §1), so one image tells
    if any(n_images):
        first = message_images(messages[next(i for i, k in enumerate(n_images) if k)])[:1]
        grid = processor.image_processor(images=first, return_tensors="pt")["image_grid_thw"]
        tokens_per_image = int(grid[0].prod()) // processor.image_processor.merge_size ** 2
    texts = [processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) for chat in messages]
    longest = max(len(processor.tokenizer(t)["input_ids"]) + k * tokens_per_image for t, k in zip(texts, n_images))
    gpu = torch.cuda.is_available()
    llm = make_llm(args.model, seed=0, max_model_len=args.max_model_len or longest + args.max_new_tokens + 16,
                   max_images=max(1, max(n_images)),  # inverse-dynamics prompts hold two
                   dtype="bfloat16" if gpu else "float32", gpu_memory_utilization=0.85)

    def run(emit):
        for start in range(0, len(messages), 256):  # emit (and so checkpoint to disk) every chunk
            for j, out in enumerate(vllm_generate(llm, processor, messages[start:start + 256], args.max_new_tokens)):
                # decoded by the hf tokenizer, as in the hf backend (vLLM's incremental detokenizer
                # holds back a trailing partial UTF-8 character)
                emit(start + j, processor.tokenizer.decode(out["token_ids"], skip_special_tokens=True), None)
    return run


# ----------------------------------------------------------------------------- summary, report, plot

def metric_names(cells):
    names = list(dict.fromkeys(k for cell in cells for k in cell if k not in ("n", "errors")))
    return [m for m in PLANNING_METRICS if m in names] + [m for m in names if m not in PLANNING_METRICS]


def gap(text, image):
    """text − image for every numeric metric, same nesting; counts are not subtracted."""
    if isinstance(text, dict):
        return {k: gap(text[k], image[k]) for k in text if k in image and k not in ("n", "errors")}
    return text - image


def summarize(records, conditions, config):
    summary = {"config": config, "conditions": {}}
    for condition in conditions:
        episodes = [{"task": r["task"], "level": r["level"], "error": r["error"], **r["metrics"]}
                    for r in records if r["condition"] == condition]
        agg = summary["conditions"][condition] = envs.aggregate(episodes)
        agg.update(errors=sum(e["error"] for e in episodes), n=len(episodes))
    if len(conditions) == 2:
        image, text = summary["conditions"]["image"], summary["conditions"]["text"]
        summary["gap_text_minus_image"] = {k: gap(text[k], image[k]) for k in ("per_level", "per_task", "macro")}
    return summary


def rows_of(agg):
    """(task, level label, cell) rows: every level, then the task mean; finally the macro."""
    rows = []
    for task, levels in agg["per_level"].items():
        for level, cell in levels.items():
            rows.append((task, str(level), cell))
        rows.append((task, "all", agg["per_task"][task]))
    rows.append(("macro", "", agg["macro"]))
    return rows


def markdown_table(title, agg, metrics, counts=True):
    head = ["task", "level"] + (["n", "errors"] if counts else []) + list(metrics)
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task, level, cell in rows_of(agg):
        count_cols = [str(cell.get("n", "")), str(cell.get("errors", ""))] if counts else []
        values = [f"{100 * cell[m]:+.1f}" if not counts and m in cell else f"{100 * cell[m]:.1f}" if m in cell else ""
                  for m in metrics]
        lines.append("| " + " | ".join([task, level] + count_cols + values) + " |")
    return "\n".join(lines) + "\n"


def write_report(summary, out, kind):
    conditions = summary["conditions"]
    first = next(iter(conditions.values()))
    metrics = metric_names(cell for levels in first["per_level"].values() for cell in levels.values())
    parts = [f"## {kind} evaluation of `{summary['config']['model']}` ({summary['config']['backend']})", "",
             "Percent of episodes; errored episodes (no response) count as failures.", ""]
    for condition, agg in conditions.items():
        parts.append(markdown_table(f"condition: {condition} ({agg['n']} episodes, {agg['errors']} errored)", agg, metrics))
    if "gap_text_minus_image" in summary:
        parts.append(markdown_table("modality gap: text − image (percentage points)",
                                    summary["gap_text_minus_image"], metrics, counts=False))
    report = "\n".join(parts)
    atomic_write(out / "report.md", report)
    return report, metrics


def plot(summary, metric, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    conditions, gaps = summary["conditions"], summary.get("gap_text_minus_image")
    values = {c: [100 * cell.get(metric, 0.0) for _, _, cell in rows_of(agg)] for c, agg in conditions.items()}
    labels = [f"{task}\n{level}" for task, level, _ in rows_of(next(iter(conditions.values())))]
    width = 0.8 / len(conditions)
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(labels) * len(conditions)), 4))
    for j, (condition, v) in enumerate(values.items()):
        ax.bar([i + (j - (len(conditions) - 1) / 2) * width for i in range(len(labels))], v, width, label=condition)
    for i, (_, _, cell) in enumerate(rows_of(gaps) if gaps else []):
        ax.annotate(f"{100 * cell.get(metric, 0.0):+.0f}", (i, max(v[i] for v in values.values()) + 2), ha="center",
                    fontsize=7)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylim(0, 110)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(f"{metric} per task and level" + (" (labels: gap text − image)" if gaps else ""))
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_gallery(rows, records, path, title, per_group=4):
    """gallery.png: a seeded sample of episodes per task and condition, failures first (mgsd/gallery.py).
    Returns what each tile shows: (id, condition, last cell, mark)."""
    image, drawn = gallery.sheet(gallery.groups(rows, records, per_group), title)
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    os.replace(tmp, path)
    return drawn


def atomic_write(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_jsonl(path, records):
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


def read_finished(path):
    """Non-errored records of a (possibly partial) episodes file; a torn last line is ignored."""
    finished = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "id" in record and not record.get("error", True):
                finished[key(record)] = record
    return finished


# ----------------------------------------------------------------------------- main

def evaluate(args):
    if args.condition != "image" and args.kind != "planning":
        cli.fail(f"--condition {args.condition} applies to planning only (perception and dynamics are visual)")
    if args.image_prompt != "recap" and args.kind != "planning":
        cli.fail("--image-prompt applies to planning only")
    if args.backend == "openai" and not args.base_url:
        cli.fail("--backend openai needs --base-url (e.g. http://localhost:8000/v1)")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", args.api_key_env):  # never echo it: it may be the key itself
        cli.fail("--api-key-env must name an environment variable (e.g. OPENAI_API_KEY), not hold the key")
    if args.base_url:  # never echo it: it may hold a key
        url, api_key = urllib.parse.urlsplit(args.base_url), os.environ.get(args.api_key_env)
        if url.scheme not in ("http", "https") or not url.hostname:
            cli.fail("--base-url must be an http:// or https:// URL (e.g. http://localhost:8000/v1)")
        if "@" in url.netloc or url.query or url.fragment or (api_key and api_key in args.base_url):
            cli.fail("--base-url must not carry credentials or a query; put the key in the variable named by --api-key-env")
        if api_key and not (api_key.isascii() and api_key.isprintable() and api_key == api_key.strip()):
            cli.fail(f"${args.api_key_env} holds a newline, a space at an end or another character no HTTP header "
                     "can carry; fix the variable")
    config = Path(args.model) / "config.json"
    if args.backend in ("hf", "vllm") and config.is_file():  # a budget past the context would run for nothing
        try:
            settings_of_model = json.loads(config.read_text())
            text = settings_of_model.get("text_config") or settings_of_model
            limit = text.get("max_position_embeddings")
        except (ValueError, AttributeError, UnicodeDecodeError) as e:
            cli.fail(f"{args.model}: cannot load its config.json ({type(e).__name__})")
        if limit and args.max_new_tokens > limit:
            cli.fail(f"--max-new-tokens {args.max_new_tokens} exceeds the model's context of {limit} tokens")
    try:
        rows = splits.load_split(args.data, kinds=[args.kind])
    except (OSError, ValueError) as e:
        cli.fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    if not rows:
        cli.fail(f"{args.data}: no {args.kind} rows")
    if args.limit:
        rows = limit_round_robin(rows, args.limit)
    conditions = ["image", "text"] if args.condition == "both" else [args.condition]
    episodes = build_episodes(rows, args.kind, conditions, args.image_prompt == "direct")

    out = Path(args.out or Path("runs/eval") / f"{args.model.strip('/').replace('/', '_')}-{args.backend}-{args.kind}")
    cli.check_out(out, args.resume, args.overwrite, [args.model, args.data], "evaluate.py")
    episodes_path = out / "episodes.jsonl"
    settings = {k: str(getattr(args, k)) for k in ("model", "data", "kind", "max_new_tokens", "backend", "condition",
                                                    "image_prompt")}
    saved = json.loads((out / "run.json").read_text()) if args.resume and (out / "run.json").is_file() else settings
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {v}" for k, v in settings.items() if saved.get(k) != v]
    if changed:  # a summary must not mix episodes of two settings
        cli.fail(f"--resume: {out} holds a run with other settings ({', '.join(changed)}); use another --out")
    wanted = {(ep["row"]["id"], ep["condition"]) for ep in episodes}
    finished = {k: r for k, r in read_finished(episodes_path).items() if k in wanted} if args.resume else {}
    todo = [ep for ep in episodes if (ep["row"]["id"], ep["condition"]) not in finished]
    print(f"{len(episodes)} episodes ({args.kind}, {'+'.join(conditions)}), {len(finished)} resumed, "
          f"{len(todo)} to run with {args.backend}", flush=True)

    t0 = time.time()
    backend = {"hf": hf_backend, "vllm": vllm_backend, "openai": chat_api.openai_backend,
               "oracle": oracle_backend}[args.backend]
    try:  # load the model before anything is written: a bad --model leaves no output behind
        run = backend(args, todo) if todo else (lambda emit: None)
    except (OSError, ValueError) as e:
        cli.fail(str(e))
    log = None

    def open_log():
        """OUT is written once the first answer is in: an endpoint that can serve nothing leaves no folder behind."""
        nonlocal log
        if log is None:
            cli.claim_out(out, clear=args.overwrite and not args.resume)
            atomic_write(out / "run.json", json.dumps(settings))
            write_jsonl(episodes_path, finished.values())  # drops errored and torn lines of the previous run
            log = open(episodes_path, "a")
        return log

    load_seconds, t0 = time.time() - t0, time.time()

    def emit(i, response, error):
        record = score_episode(todo[i], response, error)
        finished[key(record)] = record
        open_log().write(json.dumps(record) + "\n")
        log.flush()
        done = len(finished)
        if done % 50 == 0 or done == len(episodes):
            print(f"  {done}/{len(episodes)} episodes, {time.time() - t0:.1f}s", flush=True)

    try:
        run(emit)
    except chat_api.EndpointError as e:
        if log is None:
            cli.fail(f"{e}; nothing written")
        log.close()
        cli.fail(f"{e}; {len(finished)} finished episodes kept in {episodes_path} (use --resume)")
    open_log().close()
    generate_seconds = time.time() - t0

    records = [finished[(ep["row"]["id"], ep["condition"])] for ep in episodes]
    write_jsonl(episodes_path, records)
    config = {**vars(args), "episodes": len(records), "ran": len(todo), "load_seconds": round(load_seconds, 3),
              "generate_seconds": round(generate_seconds, 3)}  # holds the key's variable name, never the key
    summary = summarize(records, conditions, config)
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    report, metrics = write_report(summary, out, args.kind)
    headline = next((m for m in ("success", "all_correct", "correct") if m in metrics), metrics[0])
    plot(summary, headline, out / f"{headline}.png")
    if args.kind == "planning":  # what the model did, drawn by the simulator that scored it
        write_gallery([ep["row"] for ep in episodes], records, out / "gallery.png", f"{args.model} ({args.backend})")
    print(report)
    print(f"wrote {out}/episodes.jsonl, summary.json, report.md, {headline}.png"
          + (", gallery.png" if args.kind == "planning" else ""))
    errored = sum(r["error"] for r in records)
    if errored > args.max_error_share * len(records):
        print(f"error: {errored} of {len(records)} episodes errored (more than --max-error-share "
              f"{args.max_error_share}); they count as failures above", file=sys.stderr)
        sys.exit(1)
    return summary


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        return evaluate(args)
    except KeyboardInterrupt:
        print("error: interrupted; finished episodes are kept in episodes.jsonl (--resume continues)", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # a full disk while writing the results
        cli.fail(f"cannot write the results ({e}); the episodes written so far are kept (--resume continues)")


if __name__ == "__main__":
    main()
