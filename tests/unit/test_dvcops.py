"""Housekeeping of the flow's plot pages (dvc_plots/<run>/), and git questions asked where git cannot answer."""

from __future__ import annotations

import os
import subprocess

import pytest

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.mlops.dvcops import experiment_commit, head_commit, prune_plot_pages


def test_only_the_newest_plot_pages_are_kept(tmp_path):
    for i in range(5):
        page = tmp_path / f"run-{i}"
        page.mkdir()
        (page / "index.html").write_text("<html></html>")
        os.utime(page, (1_000_000 + i, 1_000_000 + i))  # run-4 is the newest
    (tmp_path / "stray.txt").write_text("not a page")
    removed = prune_plot_pages(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["run-0", "run-1", "run-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-3", "run-4", "stray.txt"]


def test_git_questions_fail_in_one_line_outside_a_repository_or_before_its_first_commit(tmp_path):
    """An experiment is looked up under HEAD's commit: with no commit to name, the error says so (an empty
    answer would match no experiment and blame the name)."""
    with pytest.raises(CnnpipeError, match=r"^git rev-parse HEAD failed in .*: fatal: not a git repository"):
        head_commit(tmp_path)
    with pytest.raises(CnnpipeError, match=r"^git for-each-ref .* failed in .*: fatal: not a git repository"):
        experiment_commit(tmp_path, "x")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    with pytest.raises(CnnpipeError, match=r"^git rev-parse HEAD failed in .*: fatal: ambiguous argument 'HEAD'"):
        head_commit(tmp_path)
