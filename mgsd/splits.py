"""Data splits on disk (docs/method.md §6): the instances of a split, their rows, the writer, the loader, the
scorer of any row (SCORERS), and the command line `python envs.py data / show` (envs.py hands it to main here).

Data rows (one JSON line each, pictures as relative paths, see `instance_rows`):
  planning       student prompt (image) -> reference_response   (visual SFT on reference responses, the oracle)
  planning-direct  answer-only student prompt (image) -> the plan alone  (the paper's direct visual SFT)
  text-planning  text-student prompt    -> reference_response   (text-planning pre-training)
  teacher        teacher prompt         -> reference_response   (teaches a tiny base the teacher's prompt)
  perception     numbered questions (image) -> numbered answer  (stage-1 SFT)
  dynamics       forward / inverse (two images) / verify QA with exact labels (dynamics.py)
  vision         generic grid pictures (grids.py, written by `python -m mgsd.tiny grids`)
Commands: README.md, "Data".
"""
import hashlib
import json
import multiprocessing
import os
import signal
from pathlib import Path

from PIL import Image

from envs import (DEFAULT_LEVELS, LEVEL_RANGE, TASKS, _text, _user, direct_response, draft, generate, perception_answer,
                  perception_messages, perception_prompt, reference_response, score_perception, score_planning,
                  simulate, solve, student_messages, teacher_context, teacher_messages, text_state,
                  text_student_messages, parse_plan, trajectory, fmt)
from mgsd import cli, dynamics, grids
from mgsd.pictures import STYLES, render, sprite_folder

KINDS = ("planning", "planning-direct", "text-planning", "teacher", "perception", "dynamics")
SPLITS = {"train": (0, 0.0, 0.8), "val": (10**8, 0.8, 0.9), "test": (2 * 10**8, 0.9, 1.0)}  # seed base, hash range
# The scorer of each row kind (a new kind: its module and one line here). vision: generic grids (grids.py).
SCORERS = {"planning": lambda row, response: score_planning(row["state"], response),
           "perception": lambda row, response: score_perception(row["state"], response),
           "dynamics": dynamics.score, "vision": grids.score}
SCORERS.update({kind: SCORERS["planning"] for kind in ("planning-direct", "text-planning", "teacher")})


def score_row(row, response):
    """The scores of a response to any data row, by its kind (SCORERS)."""
    if row["kind"] not in SCORERS:
        raise ValueError(f"unknown row kind {row['kind']!r}")
    return SCORERS[row["kind"]](row, response)


def collect(task, level, split, count):
    """`count` distinct (seed, state) pairs of one level for one split, or a one-line ValueError.
    A state belongs to the split whose share of the hash space its content hashes into."""
    base, lo, hi = SPLITS[split]
    quota = {"easy": -(-count // 3), "medium": -(-(count - 1) // 3) if count > 1 else 0} if task == "maze" else {}
    if task == "maze":
        quota["hard"] = count - quota["easy"] - quota["medium"]
    max_seeds, window = 20000 + int(10 * count / (hi - lo)), 5000
    seen, found, found_before = set(), [], 0
    for tried in range(max_seeds):
        if tried and tried % window == 0:  # new states only get rarer: give up once the cap is out of reach
            if (len(found) - found_before) / window * (max_seeds - tried) < count - len(found):
                break
            found_before = len(found)
        seed = base + tried
        state = draft(task, level, seed)
        if state is None:
            continue
        key = json.dumps(state, sort_keys=True, separators=(",", ":"))
        share = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
        if not lo <= share < hi or key in seen:
            continue
        if quota and quota[state["difficulty"]] == 0:
            continue
        state["plan"] = solve(state)
        if state["plan"] is None:
            continue
        seen.add(key)
        if quota:
            quota[state["difficulty"]] -= 1
        found.append((seed, state))
        if len(found) == count:
            return found
    raise ValueError(f"{task} level {level}: only {len(found)} distinct instances found for split {split} "
                     f"after {tried + 1 if tried == max_seeds - 1 else tried} seeds; ask for fewer")


# On disk every row has the same keys with the same types ("subkind" is "" outside dynamics), and
# `state` / `query` (whose fields differ between tasks and between dynamics questions) are JSON-encoded
# strings: `datasets` infers one schema from the first block of the file and cannot cast later rows
# with other fields or types. `load_split` decodes them again.
ROW_KEYS = ("id", "task", "level", "seed", "split", "kind", "subkind", "state", "plan", "image", "query", "messages",
            "answer")


def _message_row(base, kind, prompt_messages, answer, **extra):
    messages = prompt_messages + [{"role": "assistant", "content": [_text(answer)]}]
    return {**base, "kind": kind, **extra, "messages": messages, "answer": answer}


def _disk_row(row):
    encoded = {**row, "state": json.dumps(row["state"], separators=(",", ":")), "subkind": row.get("subkind", ""),
               "query": json.dumps(row.get("query") or {}, separators=(",", ":"))}
    return json.dumps({k: encoded.get(k) for k in ROW_KEYS}, separators=(",", ":"))


def instance_rows(seed, state, split, kinds, image_size, cell_size=None, style="plain"):
    """(rows of one instance in kind order, [(relative path, picture)] they reference)."""
    task, level = state["task"], state["level"]
    name = f"{task}-{level}-{seed:06d}"
    image = f"images/{name}.png"
    visual = {"planning", "planning-direct", "perception", "dynamics"}
    pictures = [(image, render(state, image_size, cell_size, style))] if visual & set(kinds) else []
    base = {"id": name, "task": task, "level": level, "seed": seed, "split": split, "state": state, "plan": state["plan"]}
    rows = []
    for kind in kinds:
        row_base = {**base, "id": f"{name}-{kind}"}
        if kind == "planning":
            rows.append(_message_row(row_base, kind, student_messages(state, image), reference_response(state), image=image))
        elif kind == "planning-direct":
            rows.append(_message_row(row_base, kind, student_messages(state, image, direct=True), direct_response(state),
                                     image=image))
        elif kind == "text-planning":
            rows.append(_message_row(row_base, kind, text_student_messages(state), reference_response(state), image=None))
        elif kind == "teacher":  # the teacher's prompt (privileged context): for a tiny base that must read it
            rows.append(_message_row(row_base, kind, teacher_messages(state), reference_response(state), image=None))
        elif kind == "perception":
            rows.append(_message_row(row_base, kind, perception_messages(state, image), perception_answer(state), image=image))
        elif kind == "dynamics":
            for sub, question, answer, query in dynamics.questions(state, seed):
                content = [_text(question), {"type": "image", "image": image}]
                if sub == "inverse":
                    after = f"images/{name}-after.png"
                    pictures.append((after, render(dynamics.moved(state, query["after"]), image_size, cell_size, style)))
                    content.append({"type": "image", "image": after})
                rows.append(_message_row({**base, "id": f"{name}-dynamics-{sub}"}, kind, _user(*content), answer,
                                         image=image, subkind=sub, query=query))
    return rows, pictures


def _rows_chunk(job):
    """JSON lines of a chunk of instances; their pictures are written as PNGs on the way."""
    items, split, kinds, image_size, cell_size, style, out_dir = job
    lines = []
    for seed, state in items:
        rows, pictures = instance_rows(seed, state, split, kinds, image_size, cell_size, style)
        for path, picture in pictures:
            picture.save(Path(out_dir) / path)
        lines += [_disk_row(row) for row in rows]
    return lines


def check_request(tasks, levels, kinds, image_size, cell_size=None, style="plain"):
    """One-line ValueError on an unknown task / kind, a task or kind named twice, or a level / image size out
    of range."""
    for what, names in (("task", tasks), ("kind", kinds)):
        if len(set(names)) < len(names):
            raise ValueError(f"a {what} is named twice: {' '.join(names)} (the rows' ids would repeat)")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")
        lo, hi = LEVEL_RANGE[task]
        for level in levels.get(task, ()):
            if not lo <= level <= hi:
                raise ValueError(f"{task} level {level} is out of range {lo}..{hi}")
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r} (choose from {', '.join(KINDS)})")
    if not 64 <= image_size <= 2048:
        raise ValueError(f"image size {image_size} is out of range 64..2048")
    if cell_size is not None:
        largest = max((level for task in tasks for level in levels.get(task, ())), default=0)
        if not 8 <= cell_size or largest * cell_size > image_size:
            raise ValueError(f"cell size {cell_size} does not fit level {largest} into {image_size} px (or is below 8)")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r} (choose from {', '.join(STYLES)})")
    if style == "sprites" and "frozenlake" in tasks:
        sprite_folder()


def level_table(tasks, levels=None):
    """{task: levels} of a request: `levels` is a list for every task or {task: levels}; unnamed: DEFAULT_LEVELS."""
    return {t: tuple(levels.get(t, DEFAULT_LEVELS[t])) if isinstance(levels, dict) else tuple(levels or DEFAULT_LEVELS[t])
            for t in tasks if t in TASKS}


def _ignore_sigint():
    """In a worker: Ctrl-C is the parent's to handle (one line), not a traceback from every worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_split(out_dir, split, per_level, tasks=None, levels=None, kinds=("planning", "perception"), workers=1,
               image_size=256, cell_size=None, style="plain", overwrite=False):
    """Write out_dir/data.jsonl and out_dir/images/ for one split, atomically (cli.atomic_dir); an existing split
    is replaced only with overwrite. levels: a list applied to every task, or {task: levels}; default DEFAULT_LEVELS."""
    tasks = list(tasks or TASKS)
    if isinstance(levels, dict) and set(levels) - set(tasks):
        raise ValueError(f"--levels names {', '.join(sorted(set(levels) - set(tasks)))}, which --tasks leaves out")
    levels = level_table(tasks, levels)
    check_request(tasks, levels, kinds, image_size, cell_size, style)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if per_level < 1:
        raise ValueError(f"--per-level must be at least 1, got {per_level}")
    out = Path(out_dir).absolute()
    if out.exists() and not (out / "data.jsonl").exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a data directory; refusing to overwrite it")
    if (out / "data.jsonl").exists() and not overwrite:
        raise ValueError(f"{out} already holds a split; --overwrite replaces it")
    anchor = next(p for p in out.parents if p.exists())
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write into {anchor}")
    instances = [collect(task, level, split, per_level) for task in tasks for level in levels[task]]
    with cli.atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        chunk = 50
        jobs = [(items[i:i + chunk], split, tuple(kinds), image_size, cell_size, style, str(tmp))
                for items in instances for i in range(0, len(items), chunk)]
        with open(tmp / "data.jsonl", "w") as f:
            if workers > 1:
                with multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_sigint) as pool:
                    for lines in pool.imap(_rows_chunk, jobs):
                        f.writelines(line + "\n" for line in lines)
            else:
                for job in jobs:
                    f.writelines(line + "\n" for line in _rows_chunk(job))
    return out


STATE_KEYS = {"frozenlake": ("start", "goal", "holes"), "maze": ("start", "target", "open"),
              "minibehaviour": ("agent", "printer", "table"), "grid": ("objects", "question")}


def row_problem(row):
    """What is wrong with a data row (types and contents, with the offending value), or None."""
    if not isinstance(row, dict):
        return f"a row must be a JSON object, got {type(row).__name__}"
    missing = [k for k in ("id", "task", "level", "kind", "state", "plan", "messages") if k not in row]
    if missing:
        return f"row misses {', '.join(missing)}"
    task, kind = row["task"], row["kind"]
    if (task, kind) != ("grid", "vision") and (task not in TASKS or kind not in KINDS):
        return f"unknown task/kind {task!r}/{kind!r} (tasks: {', '.join(TASKS)}; kinds: {', '.join(KINDS)})"
    if not isinstance(row["level"], int) or isinstance(row["level"], bool):
        return f"level must be an integer, got {row['level']!r}"
    if task == "grid" and row["level"] not in grids.GRID_SIZES:  # the oracle solves any size: keep it to the known
        return f"a grid row's level must be one of {grids.GRID_SIZES}, got {row['level']}"
    state = row["state"]
    if not isinstance(state, dict) or state.get("task") != task or state.get("level") != row["level"]:
        return f"state does not describe this {task} level {row['level']} row"
    absent = [k for k in STATE_KEYS[task] if k not in state]
    if absent:
        return f"state misses {', '.join(absent)}"
    if not isinstance(row["plan"], list) or not all(isinstance(a, str) for a in row["plan"]):
        return f"plan must be a list of actions, got {row['plan']!r}"
    if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
        return f"id must be a string or an integer, got {row['id']!r}"
    if row.get("image") is not None and not isinstance(row["image"], str):
        return f"image must be a path, got {row['image']!r}"
    messages = row["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        return "messages must be a list of {role, content} objects"
    for m in messages:
        if m.get("role") not in ("system", "user", "assistant"):
            return f"unknown message role {m.get('role')!r}"
        content = m.get("content")
        items = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(items, list):
            return f"message content must be a string or a list, got {type(content).__name__}"
        for item in items:
            if not isinstance(item, dict) or item.get("type") not in ("text", "image") \
                    or not isinstance(item.get(item.get("type")), str):
                return f"message item must be {{type: text, text: str}} or {{type: image, image: path}}, got {item!r}"
    if not any(m["role"] == "assistant" for m in messages):
        return "messages hold no assistant turn"
    return None


def row_key(row):
    """What identifies a row: its id and kind, and for dynamics rows the question."""
    return row["id"], row["kind"], row.get("subkind"), json.dumps(row.get("query"), sort_keys=True)


def _cell(value, n):
    return isinstance(value, list) and len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                and 0 <= x < n for x in value)


def state_problem(state, plan):
    """What is wrong with a task row's recorded facts, or None: the level is the grid's side and in range, every
    position lies on the grid, and the stored plan reaches the goal in the fewest actions (simulated, and checked
    against breadth-first search)."""
    task, n = state["task"], state["level"]
    lo, hi = LEVEL_RANGE[task]
    if not lo <= n <= hi:
        return f"{task} level {n} is out of range {lo}..{hi}"
    points = {"frozenlake": ("start", "goal"), "maze": ("start", "target"), "minibehaviour": ("agent", "printer")}[task]
    lists = {"frozenlake": "holes", "maze": None, "minibehaviour": "table"}[task]
    for key in points:
        if not _cell(state[key], n):
            return f"state {key} {state[key]!r} is not a cell of the {n}x{n} grid"
    if lists and (not isinstance(state[lists], list) or not all(_cell(c, n) for c in state[lists])):
        return f"state {lists} {state[lists]!r} must be a list of cells of the {n}x{n} grid"
    if task == "maze" and not (isinstance(state["open"], list) and len(state["open"]) == n and all(
            isinstance(r, list) and len(r) == n and all(isinstance(c, str) and set(c) <= set("URDL") for c in r)
            for r in state["open"])):
        return f"state open must be {n} rows of {n} strings of U/R/D/L"
    if not simulate(state, plan)["success"]:
        return f"the stored plan {''.join(plan)!r} does not reach the goal"
    shortest = solve(state)
    if len(plan) != len(shortest):
        return f"the stored plan has {len(plan)} actions; the shortest has {len(shortest)}"
    if "plan" in state and state["plan"] != plan:  # the scorer's "optimal" reads the state's copy
        return f"the state's plan {''.join(map(str, state['plan']))!r} is not the row's {''.join(plan)!r}"
    return None


MAX_PIXELS = 4096 * 4096  # a task picture is a few hundred pixels a side; anything far larger is a decompression bomb


PLAN_KINDS = ("planning", "planning-direct", "text-planning", "teacher")  # rows whose answer is the plan


def fingerprint(data_dirs):
    """sha256 of the data.jsonl files of `data_dirs`, in order: a resumed run checks that it trains on the same rows."""
    digest = hashlib.sha256()
    for folder in data_dirs:
        digest.update((Path(folder) / "data.jsonl").read_bytes())
    return digest.hexdigest()


def load_split(data_dir, kinds=None):
    """Rows of data_dir/data.jsonl (optionally only `kinds`), with image paths made absolute.
    FileNotFoundError / ValueError with a one-line message on a missing or malformed split."""
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    path = root / "data.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no data.jsonl in {root}")

    resolved, inside = {}, root.resolve()

    def resolve(rel, where):
        """The picture's absolute path: a PNG file inside the split folder (no ../, no absolute path elsewhere)."""
        if rel not in resolved:
            full = (root / rel).resolve()
            if inside not in full.parents:
                raise ValueError(f"{where}: image {rel!r} lies outside the split folder {root}")
            if not full.is_file():
                raise FileNotFoundError(f"{where}: image not found: {full}")
            with open(full, "rb") as picture:
                if picture.read(8) != b"\x89PNG\r\n\x1a\n":
                    raise ValueError(f"{where}: image {rel} is not a PNG file")
            try:  # every chunk read and its checksum checked (no pixels decoded): a broken picture fails now
                with Image.open(full) as im:
                    if im.width * im.height > MAX_PIXELS:
                        raise ValueError(f"{im.width}x{im.height} pixels, more than {MAX_PIXELS}")
                    im.verify()
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise ValueError(f"{where}: image {rel} cannot be decoded ({type(e).__name__}: {str(e)[:60]})") from None
            resolved[rel] = str(full)
        return resolved[rel]

    rows, checked, seen = [], {}, set()  # checked: instance id -> its state and plan; seen: the rows' keys
    with open(path) as f:
        for number, line in enumerate(f, 1):
            where = f"{path}:{number}"
            if not line.strip():
                continue  # a trailing blank line is not a row
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
            if kinds and isinstance(row, dict) and row.get("kind") not in kinds:
                continue
            try:  # state and query are JSON strings on disk (see ROW_KEYS)
                if isinstance(row, dict):
                    row.update({k: json.loads(row[k]) for k in ("state", "query") if isinstance(row.get(k), str)})
            except json.JSONDecodeError:
                raise ValueError(f"{where}: state or query is not JSON") from None
            problem = row_problem(row)
            seen_key = None if problem else row_key(row)
            if not problem and row["task"] in TASKS:
                facts = json.dumps([row["state"], row["plan"]], sort_keys=True)  # one check per instance
                if facts != checked.get(row["id"]):
                    if row["id"] in checked:
                        problem = f"id {row['id']!r} is used by two different instances"
                    else:
                        problem = state_problem(row["state"], row["plan"])
                        checked[row["id"]] = facts
            if not problem and seen_key in seen:
                problem = f"a second {row['kind']} row of id {row['id']!r} (a row is counted once)"
            if problem:
                raise ValueError(f"{where}: {problem}")
            seen.add(seen_key)
            if row.get("image"):
                row["image"] = resolve(row["image"], where)
            items = [item for m in row["messages"] if isinstance(m["content"], list) for item in m["content"]]
            for item in items:
                if item.get("type") == "image" and isinstance(item.get("image"), str):
                    item["image"] = resolve(item["image"], where)
            pictures = {item["image"] for item in items if item.get("type") == "image"}
            target = row["messages"][-1]["content"] if row["kind"] in PLAN_KINDS else None  # what sft.py trains on
            if isinstance(target, list):
                target = "".join(item.get("text", "") for item in target if item.get("type") == "text")
            if target is not None and parse_plan(target, row["task"]) != row["plan"]:
                raise ValueError(f"{where}: the assistant's plan is not the row's plan {''.join(row['plan'])!r}")
            if row.get("image") and row["kind"] in ("planning", "planning-direct", "perception") \
                    and pictures and pictures != {row["image"]}:  # sft reads the chat's copy, opcd and evaluate the row's
                raise ValueError(f"{where}: the chat shows another picture than the row's image {row['image']}")
            rows.append(row)
    return rows


# ---------------------------------------------------------------- command line
def parse_levels(tokens):
    """`3 4` -> [3, 4] for every task; `frozenlake=3,4 maze=3` -> {task: levels} (unnamed tasks: default)."""
    if not tokens:
        return None
    try:
        if all("=" not in t for t in tokens):
            return [int(t) for t in tokens]
        pairs = [t.split("=", 1) for t in tokens]
        table = {task: [int(level) for level in levels.split(",")] for task, levels in pairs}
    except ValueError:
        raise ValueError(f"--levels: expected integers or task=l1,l2 pairs, got {' '.join(tokens)!r}") from None
    named = [task for task, _ in pairs]
    if len(set(named)) < len(named) or any(len(set(v)) < len(v) for v in table.values()):
        raise ValueError(f"--levels names a task or a level twice: {' '.join(tokens)!r}")
    return table


def _show(args):
    state = generate(args.task, args.level, args.seed)
    if state is None:
        raise ValueError(f"{args.task} level {args.level} seed {args.seed} is skipped (no valid instance)")
    out = Path(args.out or f"{args.task}-{args.level}-{args.seed}.png")
    cli.check_out_file(out, args.overwrite)
    tmp = out.parent / f".{out.stem}.tmp-{os.getpid()}{out.suffix}"  # the same suffix: PIL picks the format by it
    plan = None
    if args.plan is not None:
        plan = parse_plan(f"<answer>{args.plan}</answer>", args.task)
        if plan is None:
            raise ValueError(f"--plan {args.plan!r} is not a plan of {args.task} actions")
    try:  # the picture first: a bad --out fails before anything is printed; written whole or not at all
        if plan is None:
            render(state, args.image_size, args.cell_size, args.frozenlake_style).save(tmp)
        else:  # the gallery's tile: the plan as a path, stopped where the simulator stops, and its mark
            from mgsd import gallery

            gallery.tile(state, plan, f"plan {args.plan}")[0].save(tmp)
        os.replace(tmp, out)
    except (ValueError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"cannot write the picture to {out} ({e})") from None
    section = lambda title, text: print(f"===== {title}\n{text}\n")
    section("state (JSON)", json.dumps(state))
    section("teacher context", teacher_context(state))
    section("text-student state", text_state(state))
    section("student prompt (the image follows)", student_messages(state, str(out))[0]["content"][0]["text"])
    section("text-student prompt", text_student_messages(state)[0]["content"][0]["text"])
    teacher = teacher_messages(state)
    section("teacher system turn", teacher[0]["content"][0]["text"])
    section("reference response", reference_response(state))
    section("perception prompt", perception_prompt(state))
    section("perception answer", perception_answer(state))
    for sub, question, answer, _ in dynamics.questions(state, args.seed):
        section(f"dynamics {sub}", f"{question}\n-> {answer}")
    if plan is not None:
        sims, status = trajectory(state, plan)
        print(f"plan drawn: {len(sims) - 1} of {len(plan)} actions taken, {status} at {fmt(sims[-1][:2])}")
    print(f"picture written to {out}")


def main(argv=None):
    parser = cli.Parser(prog="envs.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
    data = sub.add_parser("data", help="write one split: DIR/data.jsonl and DIR/images/")
    data.add_argument("--out", required=True, help="output directory (written atomically)")
    data.add_argument("--overwrite", action="store_true", help="replace an --out that already holds a split")
    data.add_argument("--split", required=True, choices=tuple(SPLITS), help="which split (disjoint seeds and states)")
    data.add_argument("--per-level", type=int, required=True, help="instances per (task, level)")
    data.add_argument("--tasks", nargs="+", default=list(TASKS), help="tasks to include (default: all three)")
    data.add_argument("--levels", nargs="+",
                      help="levels for every task (3 4), or per task (frozenlake=3,4 maze=3); default DEFAULT_LEVELS")
    data.add_argument("--kinds", default="planning,perception", type=cli.names, help=f"comma-separated row kinds from {','.join(KINDS)}")
    data.add_argument("--workers", type=cli.positive_int, default=1, help="processes rendering and writing rows")
    data.add_argument("--image-size", type=int, default=256, help="picture side in pixels (tiny models: 160)")
    data.add_argument("--cell-size", type=int, default=None,
                      help="draw each grid cell this many pixels wide at the top-left (tiny models: 32, one merged "
                           "vision token per cell); default: the grid fills the picture")
    data.add_argument("--frozenlake-style", default="plain", choices=STYLES,
                      help="plain: drawn with PIL primitives, no assets; sprites: gymnasium's FrozenLake sprites, as the "
                           "VSP benchmark's pictures (needs gymnasium<1.4 installed)")
    show = sub.add_parser("show", help="print every view, prompt and QA pair of one instance and write its picture")
    show.add_argument("task", choices=TASKS, help="the task")
    show.add_argument("--level", type=int, required=True, help="grid side")
    show.add_argument("--seed", type=cli.seed, required=True, help="instance seed")
    show.add_argument("--out", help="picture path (default TASK-LEVEL-SEED.png)")
    show.add_argument("--overwrite", action="store_true", help="replace an existing picture at --out")
    show.add_argument("--plan", default=None, help="draw this plan over the instance as the gallery does (UURD or "
                                                   "U,PICK,R,DROP): its path, where the simulator stops, and its mark")
    show.add_argument("--image-size", type=int, default=256, help="picture side in pixels")
    show.add_argument("--cell-size", type=int, default=None, help="cell side in pixels (see data --cell-size)")
    show.add_argument("--frozenlake-style", default="plain", choices=STYLES, help="see data --frozenlake-style")
    args = parser.parse_args(argv)
    try:
        if args.command == "data":
            kinds = [k for k in args.kinds.split(",") if k]
            out = make_split(args.out, args.split, args.per_level, args.tasks, parse_levels(args.levels), kinds,
                             args.workers, args.image_size, args.cell_size, args.frozenlake_style, args.overwrite)
            print(f"wrote {out / 'data.jsonl'}")
        else:
            check_request([args.task], {args.task: [args.level]}, [], args.image_size, args.cell_size,
                          args.frozenlake_style)
            _show(args)
    except (ValueError, OSError) as e:
        cli.fail(e)


if __name__ == "__main__":
    cli.interruptible(main, "nothing written (a split is written whole or not at all)")
