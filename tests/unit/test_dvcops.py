"""Housekeeping of the flow's plot pages (dvc_plots/<run>/)."""

from __future__ import annotations

import os

from cnnpipe.mlops.dvcops import prune_plot_pages


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
