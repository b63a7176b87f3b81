"""The package's layers import each other in one direction only (docs/design.md).

Every module's imports are read from its source (``ast``, nested and lazy imports included), so an
arrow the design does not allow fails here with the module, the line and the arrow named, and
so does any import cycle between modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "llmscratch"

LEAVES = {"errors", "files", "runtime", "__init__", "__main__"}
# a layer → the layers and leaves it may import (its own always allowed)
ALLOWED = {
    "nn": {"errors"},
    "data": {"errors", "files"},
    "store": {"nn", "data", "errors", "files"},
    "training": {"nn", "data", "store", "inference", "runtime", "errors", "files"},
    "inference": {"nn", "data", "store", "runtime", "errors", "files"},
    "tools": {"nn", "data", "store", "training", "inference", "runtime", "errors", "files", "__init__"},
    "serve": {"nn", "data", "store", "inference", "runtime", "errors", "files"},
    "cli": {"nn", "data", "store", "training", "inference", "tools", "serve", "runtime", "errors", "files",
            "__init__"},
    "errors": set(),
    "files": {"errors"},
    "runtime": {"errors"},
    "__init__": set(),
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """llmscratch.nn.model → nn; llmscratch.errors → errors; llmscratch → __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, name: str | None = None) -> list[tuple[int, str]]:
    """(line, imported llmscratch module) for every import in the file, relative ones resolved."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "llmscratch"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "llmscratch":
                continue
            modules = known_modules()
            # `from . import x` imports the module x where there is one
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            found += [(node.lineno, s) for s in subs] or [(node.lineno, target)]
    return found


_KNOWN: set[str] = set()


def known_modules() -> set[str]:
    if not _KNOWN:
        _KNOWN.update(module_name(p) for p in PACKAGE.rglob("*.py"))
    return _KNOWN


def all_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    for path in all_files():
        assert layer_of(module_name(path)) in ALLOWED, f"{path.relative_to(PACKAGE)} is in no layer of docs/design.md"


def wrong_arrows(path: Path, name: str) -> list[str]:
    here = layer_of(name)
    return [f"{name} (line {line}) imports {target} ({here} → {layer_of(target)})"
            for line, target in imports_of(path, name)
            if layer_of(target) != here and layer_of(target) not in ALLOWED[here]]


@pytest.mark.parametrize("path", all_files(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_arrows(path):
    wrong = wrong_arrows(path, module_name(path))
    assert not wrong, "arrows the design does not allow:\n" + "\n".join(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (a path that comes back to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = {module_name(p): {t for _, t in imports_of(p) if t in known_modules()} - {module_name(p)}
             for p in all_files()}
    # a package's __init__ importing its own modules is how packages work, not a cycle
    graph = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_check_sees_a_wrong_arrow(tmp_path):
    # the reader itself: a module of nn importing the CLI, lazily, inside a function, is reported
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ..cli import COMMANDS\n    return COMMANDS\n", encoding="utf-8")
    assert wrong_arrows(probe, "llmscratch.nn.probe") == ["llmscratch.nn.probe (line 2) imports llmscratch.cli (nn → cli)"]
    assert wrong_arrows(probe, "llmscratch.cli.probe") == []  # the CLI may import itself
