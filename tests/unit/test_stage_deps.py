"""dvc.yaml lists, for every stage, exactly the modules of src/cnnpipe its command runs (its import closure), so
a change to any of them reruns the stage and a change to any other module does not."""

from __future__ import annotations

import ast

from stagedeps import dvc_stages, imported_modules, module_path, stage_closure


def test_every_stage_lists_exactly_its_import_closure():
    for name, stage in dvc_stages().items():
        command = stage["cmd"].split()
        assert command[0] == "cnnpipe", f"{name}: expected a `cnnpipe <stage>` command"
        deps = {d for d in stage["deps"] if d.startswith("src/")}
        expected = stage_closure(command[1])
        assert deps == expected, (f"{name}: dvc.yaml lists {sorted(deps - expected)} that it does not run, "
                                  f"misses {sorted(expected - deps)}; `python tests/stagedeps.py` rewrites them")


def test_no_stage_imports_another_stage():
    stages = {f"cnnpipe.stages.{name}" for name in dvc_stages()}
    for name in dvc_stages():
        imports = imported_modules([ast.parse(module_path(f"cnnpipe.stages.{name}").read_text())])
        assert not imports & stages, f"{name} imports {sorted(imports & stages)}: move the shared code to a library"


def test_closure_follows_function_level_and_package_imports(tmp_path, monkeypatch):
    """The analysis itself: lazy imports inside functions and `from cnnpipe.core import x` count."""
    tree = ast.parse("def f():\n    from cnnpipe.serve.predictor import Predictor\n"
                     "from cnnpipe.core import own_images\nimport os\n")
    assert imported_modules([tree]) == {"cnnpipe", "cnnpipe.serve", "cnnpipe.serve.predictor", "cnnpipe.core",
                                        "cnnpipe.core.own_images"}
    assert imported_modules([ast.parse("import os\n")]) == set()
