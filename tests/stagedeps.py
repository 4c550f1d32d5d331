"""The modules of src/cnnpipe a `cnnpipe <stage>` command runs (its import closure), read from the code with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cnnpipe"
ENTRY = PACKAGE / "cli.py"


def module_path(name: str) -> Path:
    """cnnpipe.stages.train -> src/cnnpipe/stages/train.py (cnnpipe -> src/cnnpipe/__init__.py)."""
    parts = name.split(".")[1:]
    path = PACKAGE.joinpath(*parts)
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_modules(nodes: list[ast.AST]) -> set[str]:
    """cnnpipe modules imported anywhere in these nodes (module level or inside functions)."""
    found: set[str] = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "cnnpipe"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "cnnpipe":
                continue
            found.add(node.module)
            for alias in node.names:  # `from cnnpipe.core import own_images` imports a module
                if module_path(f"{node.module}.{alias.name}").is_file():
                    found.add(f"{node.module}.{alias.name}")
    # importing cnnpipe.core.x runs cnnpipe/__init__.py and cnnpipe/core/__init__.py first
    parents = {".".join(m.split(".")[:i]) for m in found for i in range(1, m.count(".") + 1)}
    return found | parents


def closure(paths: set[Path]) -> set[Path]:
    todo, seen = list(paths), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        todo += [module_path(m) for m in imported_modules([tree])]
    return seen


def stage_closure(command: str) -> set[str]:
    """The modules `cnnpipe <command>` runs: cli.py's module-level imports, the imports inside its handler
    `_<command>`, and everything those import in turn."""
    tree = ast.parse(ENTRY.read_text())
    top = [n for n in tree.body if not isinstance(n, ast.FunctionDef | ast.ClassDef)]
    handler = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == f"_{command}"]
    assert handler, f"cli.py has no handler _{command}"
    start = {module_path(m) for m in imported_modules(top + handler) | {"cnnpipe"}}
    return {str(p.relative_to(ROOT)) for p in closure(start) | {ENTRY}}


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def rewrite_deps(path: Path = ROOT / "dvc.yaml") -> None:
    """Rewrite the src/ deps of every stage in dvc.yaml to its import closure (cli.py and the stage's module
    first, the rest sorted), keeping every other line and comment as it is."""
    stages = dvc_stages()
    lines, out, stage = path.read_text().splitlines(), [], None
    i = 0
    while i < len(lines):
        name = lines[i].strip().removesuffix(":")
        if lines[i].startswith("  ") and not lines[i].startswith("   ") and name in stages:
            stage = name
        if lines[i].startswith("      - src/cnnpipe/"):
            while i < len(lines) and lines[i].startswith("      - src/cnnpipe/"):
                i += 1
            first = ["src/cnnpipe/cli.py", f"src/cnnpipe/stages/{stage}.py"]
            rest = sorted(stage_closure(stages[stage]["cmd"].split()[1]) - set(first))
            out += [f"      - {m}" for m in first + rest]
            continue
        out.append(lines[i])
        i += 1
    path.write_text("\n".join(out) + "\n")


if __name__ == "__main__":  # python tests/stagedeps.py: make dvc.yaml's code deps match the imports
    rewrite_deps()
