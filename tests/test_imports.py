"""The package's import graph, read from the source with ast (imports inside functions included), has no cycle."""
import ast
from pathlib import Path


PACKAGE = Path(__file__).parents[1] / "finetune"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the finetune modules it imports (``from . import x`` counts x when x is a module)."""
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (".".join(package.split(".")[:len(package.split(".")) - node.level + 1]) if node.level else "")
                base = ".".join(x for x in (base, node.module) if x)
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            # a module's own packages are imported before it anyway (and the root only maps lazy names): no edge
            deps |= {t for t in targets if t in files and not name.startswith(t + ".")}
        graph[name] = deps - {name}
    return graph


def on_a_cycle(graph: dict[str, set[str]], node: str) -> bool:
    """Whether ``node`` can reach itself through the graph's edges."""
    seen, todo = set(), list(graph.get(node, ()))
    while todo:
        n = todo.pop()
        if n == node:
            return True
        if n not in seen:
            seen.add(n)
            todo += graph.get(n, ())
    return False


INFERENCE = {"finetune.predict", "finetune.evaluate", "finetune.export", "finetune.report", "finetune.plots"}


def test_the_checker_finds_a_cycle():
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [n for n in sorted(toy) if on_a_cycle(toy, n)] == ["a", "b", "c"]
    graph = import_graph()
    assert "finetune.predict" in graph["finetune.evaluate"] and "finetune.predict" in graph["finetune.export"]
    assert "finetune.freeze.rule" in graph["finetune.freeze.plan"]  # from . import rule


def test_no_import_cycle_through_the_inference_modules():
    """evaluate -> predict -> export -> evaluate and report <-> evaluate were cycles (issue 12)."""
    graph = import_graph()
    assert [n for n in sorted(INFERENCE) if on_a_cycle(graph, n)] == []


def test_no_import_cycles():
    """backbone -> run -> freeze.hold -> freeze.plan -> domain -> backbone (atomic_write now in fileio), train <->
    lr_find (find_only now in train) and train <-> packed (pack now in its own module) were cycles (issue 12)."""
    graph = import_graph()
    assert [n for n in sorted(graph) if on_a_cycle(graph, n)] == []
