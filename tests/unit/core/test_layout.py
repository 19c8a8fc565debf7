"""The package's layout: stages import only themselves and earlier stages, no import circles, no private names across modules."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers.paths import ROOT

#: The stages in the order data flows through them; a stage may import itself and the stages before it.
STAGES = ("core", "sources", "prepare", "models", "train", "generate", "evaluate", "release")
#: Workflow-level modules that wire the stages together (the config's checks need every stage's vocabulary).
TOP_LEVEL = {"maisi", "maisi.config", "maisi.dryrun", "maisi.profiles"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "maisi").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every ``maisi`` import, at module level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "maisi" and node.level == 0:
            out.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "maisi"]
    return out


def _stage(module: str) -> int | None:
    parts = module.split(".")
    return STAGES.index(parts[1]) if len(parts) > 1 and parts[1] in STAGES else None


def test_every_module_lives_in_a_stage():
    stray = sorted(m for m in _modules() if _stage(m) is None and m not in TOP_LEVEL)
    assert not stray, f"modules outside the stage folders: {stray}"


def test_imports_flow_forward_through_the_stages():
    backwards = []
    for module, path in _modules().items():
        own = _stage(module)
        if own is None:
            continue
        for target, _, line in _imports(path):
            other = _stage(target)
            if other is None or other > own:
                backwards.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not backwards, "\n".join(backwards)


def test_no_module_imports_another_modules_private_names():
    private = []
    for module, path in _modules().items():
        for target, names, line in _imports(path):
            private += [f"{path.relative_to(ROOT)}:{line} {target}.{n}" for n in names if n.startswith("_") and target != module]
    assert not private, "\n".join(private)


def test_no_import_circles():
    modules = _modules()

    def resolve(target: str, names: list[str]) -> set[str]:
        subs = {f"{target}.{n}" for n in names if f"{target}.{n}" in modules}  # `from maisi.x import submodule`
        return subs or ({target} if target in modules else set())

    graph = {m: set().union(*[resolve(t, n) for t, n, _ in _imports(p)] or [set()]) - {m} for m, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)
