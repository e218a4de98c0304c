"""The layout's promises, checked on the source: no import cycles (function-local imports included), dependencies
point down as docs/design-notes.md draws them, nothing shadows the standard library, nothing but tests, examples,
benchmarks and scripts imports ``peft_vision_lora.testing``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "peft_vision_lora"

# Each top-level part of the package, and the parts it may import. Upward or sideways edges are bugs.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "quiet_imports": set(),
    "kernels": set(),
    "zoo": set(),
    "data": set(),
    "resolve": {"errors"},
    "tuner": {"errors", "resolve", "kernels"},
    "sharing": {"errors", "resolve", "tuner"},
    "integrations": {"errors", "resolve", "tuner"},
    "reports": {"errors", "resolve", "tuner", "kernels", "integrations", "sharing", "zoo"},
    "cli": {"reports", "sharing"},
    # fixtures sit above the product (only tests, examples, benchmarks and scripts import them)
    "testing": {"errors", "zoo", "data", "resolve", "tuner", "kernels", "sharing", "integrations", "reports"},
    "tiny_models": {"zoo"},  # the first name of zoo.tiny, kept for the docs
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports, at any depth (functions, TYPE_CHECKING blocks too)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if _ours(alias.name)}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not _ours(target):
                continue
            for alias in node.names:  # `from . import x` imports the submodule x
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _source_of(candidate) else target)
    return {name for name in found if name != module}


def _ours(module: str) -> bool:
    return module == "peft_vision_lora" or module.startswith("peft_vision_lora.")


def _source_of(module: str) -> Path | None:
    path = ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _graph() -> dict[str, set[str]]:
    return {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in graph.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checker_sees_function_local_and_relative_imports(tmp_path):
    graph = _graph()
    assert "peft_vision_lora.tuner.strict_load" in graph["peft_vision_lora.tuner.model"]
    assert "peft_vision_lora.kernels.triton_lora" in graph["peft_vision_lora.kernels.dispatch"]  # inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_import_of_the_package_resolves():
    """A stale path (a moved module imported lazily) would otherwise fail only when that code path runs."""
    missing = sorted(f"{m} -> {t}" for m, imported in _graph().items() for t in imported if _source_of(t) is None)
    assert missing == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_dependencies_point_down():
    wrong = []
    for module, imported in _graph().items():
        part = _part(module)
        if part == "__init__":
            continue
        for target in imported:
            other = _part(target)
            if other != part and other not in ALLOWED[part]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_every_part_has_a_rule():
    parts = {_part(m) for m in _graph()} - {"__init__"}
    assert parts == set(ALLOWED)


def test_config_is_data():
    """The config imports no I/O, card, saving or registration code."""
    imported = _graph()["peft_vision_lora.tuner.config"]
    assert imported <= {
        "peft_vision_lora.errors",
        "peft_vision_lora.kernels.dispatch",
        "peft_vision_lora.resolve.names",
        "peft_vision_lora.tuner.lora_options",  # the table of LoraConfig fields: data too
        "peft_vision_lora.tuner.peft_type",
    }


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_shadows_the_standard_library(path):
    assert path.stem not in sys.stdlib_module_names


def test_only_tests_examples_benchmarks_and_scripts_import_testing():
    importers = [m for m, imported in _graph().items() if any(_part(t) == "testing" for t in imported)]
    assert [m for m in importers if _part(m) != "testing"] == []
