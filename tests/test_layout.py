"""The house: the root holds the method's stage files, the plumbing lives in mgsd/, and no module imports
another that imports it back (directly or round a longer circle). Imports are read from the source (ast), in
functions and `if __name__ == "__main__":` blocks too (envs.py's command line hands over to mgsd/splits.py as a
process, not by an import)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = {"envs", "sft", "opcd", "evaluate", "merge", "pipeline"}


def modules():
    """{module name: path} of the project's code: the root's files and the mgsd package."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    found.update({f"mgsd.{p.stem}": p for p in (ROOT / "mgsd").glob("*.py") if p.stem != "__init__"})
    return found


def project_imports(path, names):
    """The project modules a file imports, anywhere in it."""
    found, todo = set(), list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "mgsd":
                found |= {f"mgsd.{a.name}" for a in node.names if f"mgsd.{a.name}" in names}
            elif node.module in names:
                found.add(node.module)
        todo.extend(ast.iter_child_nodes(node))
    return found


def test_the_root_holds_the_stage_files_and_mgsd_the_rest():
    assert {p.stem for p in ROOT.glob("*.py")} == STAGES
    assert set(modules()) - STAGES and all(name.startswith("mgsd.") for name in set(modules()) - STAGES)


def circles(graph):
    """Every circle a depth-first walk of {node: nodes it imports} meets, as [a, b, ..., a]."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return found


def test_no_import_circle():
    names = modules()
    graph = {name: project_imports(path, names) for name, path in names.items()}
    assert graph["opcd"] >= {"envs", "mgsd.common"}  # the reader sees real edges
    found = circles(graph)
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_tasks_are_the_ground_floor():
    """envs.py imports nothing of the project but the pictures' legend; the pictures import nothing of it."""
    names = modules()
    assert project_imports(names["envs"], names) == {"mgsd.pictures"}
    assert project_imports(names["mgsd.pictures"], names) == set()
    assert "envs" in project_imports(names["mgsd.splits"], names)  # the data layer stands on the tasks


def test_the_circle_finder_finds_a_circle(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    (tmp_path / "c.py").write_text("if __name__ == '__main__':\n    import a\n")
    names = {"a": tmp_path / "a.py", "b": tmp_path / "b.py", "c": tmp_path / "c.py"}
    assert project_imports(names["a"], names) == {"b"} and project_imports(names["b"], names) == {"a"}
    assert project_imports(names["c"], names) == {"a"}
    graph = {name: project_imports(path, names) for name, path in names.items()}
    assert circles(graph) == [["a", "b", "a"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert circles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
