"""Import the paper's evaluation benchmarks, VSP FrozenLake and the VisualPlanning test files, as ordinary
split folders (data.jsonl + images) that evaluate.py and opcd.py --val-data read unchanged. Their formats:
docs/method.md §9. VSP's own pictures are used as they are; VisualPlanning's states are re-rendered by
pictures.render, as the reference does. Every instance is checked: our BFS plan has the benchmark's length,
or the import stops with one error naming the file and line.

    python -m mgsd.benchmarks vsp SRC/vsp-frozenlake --out data/bench/vsp
    python -m mgsd.benchmarks visualplanning SRC/frozenlake-test.jsonl SRC/maze-test.jsonl SRC/minibehaviour-test.jsonl \\
        --out data/bench/visualplanning
    python evaluate.py --model MODEL --data data/bench/vsp --condition both
"""
import json
import re
import shutil
from pathlib import Path

import envs
from mgsd import cli, pictures, splits

WALLS = {"north": "U", "east": "R", "south": "D", "west": "L"}


class BenchmarkError(ValueError):
    pass


def _checked(state, expected_length, where):
    """The state with its BFS plan, after checking the plan length against the benchmark's."""
    plan = envs.solve(state)
    if plan is None or len(plan) != expected_length:
        raise BenchmarkError(f"{where}: our shortest plan has {None if plan is None else len(plan)} actions, "
                             f"the benchmark says {expected_length}")
    return {**state, "plan": plan}


def vsp_table(text, where):
    """A VSP markdown table -> (level, start, goal, holes)."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")][1:]
            for line in text.strip().splitlines()[1:] if line.strip()]
    n = len(rows)
    if n == 0 or any(len(r) != n for r in rows) or any(c not in "_#@*" or not c for r in rows for c in r):
        raise BenchmarkError(f"{where}: not a square table of _ # @ *")
    find = lambda symbol: [[r, c] for r in range(n) for c in range(n) if rows[r][c] == symbol]
    if len(find("@")) != 1 or len(find("*")) != 1:
        raise BenchmarkError(f"{where}: needs exactly one player @ and one goal *")
    return n, find("@")[0], find("*")[0], find("#")


def import_vsp(src, draw_missing=False):
    """[(row, picture source)] of the VSP FrozenLake folder `src` (levelN/ subfolders)."""
    src = Path(src)
    levels = sorted((int(m.group(1)), p) for p in src.glob("level*") if (m := re.fullmatch(r"level(\d+)", p.name)))
    if not levels:
        raise BenchmarkError(f"{src}: no levelN folders")
    out = []
    for level, folder in levels:
        meta_path = folder / "metadata.json"
        try:
            plans = json.loads(meta_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BenchmarkError(f"{meta_path}: unreadable ({e})") from None
        for table in sorted((folder / "table").glob("*.txt"), key=lambda p: int(p.stem)):
            k = int(table.stem)
            n, start, goal, holes = vsp_table(table.read_text(), table)
            if n != level:
                raise BenchmarkError(f"{table}: a {n}x{n} table in level{level}")
            if f"{k}.png" not in plans:
                raise BenchmarkError(f"{meta_path}: no reference plan for {k}.png")
            state = _checked({"task": "frozenlake", "level": n, "start": start, "goal": goal, "holes": holes},
                             len(plans[f"{k}.png"]), table)
            picture = folder / "img" / f"{k}.png"
            if not picture.is_file() and not draw_missing:
                raise BenchmarkError(f"{picture}: picture not found (--draw-missing draws it with pictures.render)")
            out.append((state, f"vsp-frozenlake-{level}-{k}", k, picture if picture.is_file() else None))
    return out


def _flat(index, n):
    return [index // n, index % n]


def visualplanning_state(meta, where):
    """(state, expected plan length) of one VisualPlanning record's meta dict."""
    n = meta["level"]
    layout = meta.get("layout")
    if "printer_pos" in meta:
        state = {"task": "minibehaviour", "level": n, "agent": list(meta["start_pos"]), "printer": list(meta["printer_pos"]),
                 "table": sorted(list(p) for p in meta["table_pos"])}
        return state, None
    if layout and isinstance(layout[0][0], dict):
        open_ = [["".join(a for a in "URDL" if not cell[{v: k for k, v in WALLS.items()}[a]]) for cell in row]
                 for row in layout]
        state = {"task": "maze", "level": n, "start": _flat(meta["start_pos"], n), "target": _flat(meta["target_pos"], n),
                 "open": open_}
        return state, meta.get("distance_map", {}).get(str(meta["start_pos"]))
    if layout and isinstance(layout[0][0], str):
        cells = lambda s: [[r, c] for r in range(n) for c in range(n) if layout[r][c] == s]
        state = {"task": "frozenlake", "level": n, "start": _flat(meta["start_pos"], n),
                 "goal": _flat(meta["target_pos"], n), "holes": cells("H")}
        if cells("S") != [state["start"]] or cells("G") != [state["goal"]]:
            raise BenchmarkError(f"{where}: layout S/G disagree with start_pos/target_pos")
        return state, meta.get("distance_map", {}).get(str(meta["start_pos"]))
    raise BenchmarkError(f"{where}: not a FrozenLake, Maze or MiniBehaviour record")


def import_visualplanning(files):
    out = []
    for path in map(Path, files):
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise BenchmarkError(f"{path}: unreadable ({e.strerror})") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
                state, expected = visualplanning_state(record["meta"], where)
                if expected is None:  # the best path: a list of states, one per action
                    expected = len(record["input_state"]) - 1
            except (json.JSONDecodeError, KeyError, TypeError, IndexError) as e:
                raise BenchmarkError(f"{where}: malformed record ({type(e).__name__}: {e})") from None
            state = _checked(state, expected, where)
            out.append((state, f"visualplanning-{state['task']}-{state['level']}-{number - 1}", number - 1, None))
    return out


def write_split(items, out_dir, image_size=256, cell_size=None, style="plain"):
    """Planning rows + pictures in out_dir (must not exist), written to a temporary sibling and renamed."""
    out = Path(out_dir).absolute()
    if out.exists():
        raise BenchmarkError(f"{out} exists; remove it or pick another --out")
    with cli.atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        with open(tmp / "data.jsonl", "w") as f:
            for state, name, index, picture in items:
                image = f"images/{name}.png"
                if picture is not None:
                    shutil.copyfile(picture, tmp / image)
                elif cell_size and state["level"] * cell_size > image_size:
                    raise BenchmarkError(f"{name}: level {state['level']} does not fit {cell_size}-px cells into "
                                         f"{image_size} px (lower --cell-size or raise --image-size)")
                else:
                    pictures.render(state, image_size, cell_size, style).save(tmp / image)
                base = {"id": name, "task": state["task"], "level": state["level"], "seed": index, "split": "test",
                        "state": state, "plan": state["plan"]}
                row = splits._message_row(base, "planning", envs.student_messages(state, image),
                                        envs.reference_response(state), image=image)
                f.write(splits._disk_row(row) + "\n")
        try:  # read back as every stage will read it: a split evaluate.py would refuse is never written
            splits.load_split(tmp)
        except (ValueError, FileNotFoundError) as e:
            raise BenchmarkError(f"the imported split would not load: {str(e).replace(str(tmp), str(out))}") from None
    return out


def main(argv=None):
    parser = cli.Parser(prog="python -m mgsd.benchmarks", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="benchmark", required=True, parser_class=cli.Parser)
    vsp = sub.add_parser("vsp", help="VSP FrozenLake: a folder of levelN/{table,img,metadata.json}")
    vsp.add_argument("src", help="the vsp-frozenlake folder")
    vsp.add_argument("--draw-missing", action="store_true",
                     help="draw a map whose picture is missing with pictures.render instead of stopping")
    vp = sub.add_parser("visualplanning", help="VisualPlanning test JSONL files (any of the three tasks)")
    vp.add_argument("src", nargs="+", help="JSONL files")
    for p in (vsp, vp):
        p.add_argument("--out", required=True, help="output split folder (must not exist)")
        p.add_argument("--image-size", type=int, default=256, help="side of drawn pictures in pixels (default 256)")
        p.add_argument("--cell-size", type=int, default=None, help="cell side of drawn pictures (see envs.py data)")
        p.add_argument("--frozenlake-style", default="plain", choices=pictures.STYLES,
                       help="FrozenLake pictures drawn (see envs.py data); sprites: as the VSP benchmark's own")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    for src in [args.src] if isinstance(args.src, str) else args.src:
        if out == Path(src).resolve() or Path(src).resolve() in out.parents:
            cli.fail(f"--out {args.out} lies inside the source {src}; choose another --out")
    if not 64 <= args.image_size <= 2048 or (args.cell_size is not None and args.cell_size < 8):
        cli.fail(f"--image-size {args.image_size} must be 64..2048 and --cell-size at least 8")
    try:
        items = import_vsp(args.src, args.draw_missing) if args.benchmark == "vsp" else import_visualplanning(args.src)
        out = write_split(items, args.out, args.image_size, args.cell_size, args.frozenlake_style)
    except (BenchmarkError, OSError, ValueError) as e:
        cli.fail(e)
    counts = {}
    for state, *_ in items:
        key = f"{state['task']} {state['level']}"
        counts[key] = counts.get(key, 0) + 1
    drawn = sum(picture is None for *_, picture in items) if args.benchmark == "vsp" else len(items)
    print(f"wrote {out / 'data.jsonl'}: {len(items)} instances ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))}), "
          f"every shortest-plan length as the benchmark's; {drawn} pictures drawn by pictures.render")


if __name__ == "__main__":
    cli.interruptible(main, "nothing written (written whole or not at all)")
