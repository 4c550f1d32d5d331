"""dvc.yaml lists, for every stage, exactly the modules of src/cnnpipe its command runs (its import closure), so
a change to any of them reruns the stage and a change to any other module does not."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml
from conftest import ROOT

PACKAGE = ROOT / "src" / "cnnpipe"
ENTRY = PACKAGE / "cli.py"


def module_path(name: str) -> Path:
    """cnnpipe.train -> src/cnnpipe/train.py (cnnpipe -> src/cnnpipe/__init__.py)."""
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
            for alias in node.names:  # `from cnnpipe import custom` imports a module
                if module_path(f"{node.module}.{alias.name}").is_file():
                    found.add(f"{node.module}.{alias.name}")
    # importing cnnpipe.x runs cnnpipe/__init__.py first
    return found | {"cnnpipe"} if found else found


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


def test_every_stage_lists_exactly_its_import_closure():
    for name, stage in dvc_stages().items():
        command = stage["cmd"].split()
        assert command[0] == "cnnpipe", f"{name}: expected a `cnnpipe <stage>` command"
        deps = {d for d in stage["deps"] if d.startswith("src/")}
        expected = stage_closure(command[1])
        assert deps == expected, (f"{name}: dvc.yaml lists {sorted(deps - expected)} that it does not run, "
                                  f"misses {sorted(expected - deps)}")


def test_no_stage_imports_another_stage():
    stages = {f"cnnpipe.{name}" for name in dvc_stages()}
    for name in dvc_stages():
        imports = imported_modules([ast.parse(module_path(f"cnnpipe.{name}").read_text())])
        assert not imports & stages, f"{name} imports {sorted(imports & stages)}: move the shared code to a library"


def test_closure_follows_function_level_and_package_imports(tmp_path, monkeypatch):
    """The analysis itself: lazy imports inside functions and `from cnnpipe import x` count."""
    tree = ast.parse("def f():\n    from cnnpipe.predictor import Predictor\nfrom cnnpipe import custom\nimport os\n")
    assert imported_modules([tree]) == {"cnnpipe", "cnnpipe.predictor", "cnnpipe.custom"}
    assert imported_modules([ast.parse("import os\n")]) == set()
