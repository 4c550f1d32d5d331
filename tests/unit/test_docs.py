"""The documents hold figures only through generated blocks (README.md, docs/benchmarks.md), read from the JSON
file each figure comes from; comments in code and params.yaml say what a setting does, without measurements."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["README.md", "docs/benchmarks.md"]
# a measurement: a number with a unit of time, speed or share (e.g. "26 s each", "93.64 %", "1,702 img/s")
MEASURED = re.compile(r"\d[\d,.]*\s?(%|ms\b|s each|seconds\b|img/s|images/s|MB\b|GB\b|[x×] (faster|slower|smaller))")
CODE = sorted(p.relative_to(ROOT).as_posix() for d in ("src", "pipeline", "scripts")
              for p in (ROOT / d).rglob("*.py"))


def cog(*args: str, root: Path = ROOT, rev: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "DOCFIGURES_REV": rev}
    cmd = [sys.executable, "-m", "cogapp", "-I", str(root / "scripts"), "-p", "import docfigures as figures", *args]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)


def check_figures(root: Path) -> subprocess.CompletedProcess:
    """The documents against the figure files of the working tree; where a local run (`make run`) has rewritten
    metrics/ or bench/ since the last commit, against the committed files, which the committed documents
    describe."""
    proc = cog("--check", "--diff", *DOCS, root=root)
    changed = subprocess.run(["git", "status", "--porcelain", "--", "metrics", "bench"], cwd=root,
                             capture_output=True, text=True, check=True).stdout.strip()
    if proc.returncode != 0 and changed:
        proc = cog("--check", "--diff", *DOCS, root=root, rev="HEAD")
    return proc


def test_generated_figures_match_their_files():
    proc = check_figures(ROOT)
    assert proc.returncode == 0, f"run `make docs`:\n{proc.stdout[-3000:]}{proc.stderr[-2000:]}"


def test_a_local_run_keeps_the_committed_documents_valid_and_a_hand_edit_is_still_caught(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    shutil.copy(ROOT / "scripts" / "docfigures.py", clone / "scripts")  # the code under test, committed or not
    train = clone / "metrics" / "train.json"
    figures = json.loads(train.read_text())
    train.write_text(json.dumps(dict(figures, sec=figures["sec"] + 1)))  # what a rerun of training does
    assert cog("--check", "README.md", root=clone).returncode != 0  # the README quotes the committed time
    assert check_figures(clone).returncode == 0
    readme = clone / "README.md"
    readme.write_text(re.sub(r"\*\*[\d.]+ %\*\*", "**99.99 %**", readme.read_text(), count=1))
    assert check_figures(clone).returncode != 0


def test_a_figure_edited_by_hand_is_caught(tmp_path):
    copy = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    block = re.search(r"\[\[\[cog figures\.results\(\)\]\]\] -->\n(.*?)<!-- \[\[\[end\]\]\]", text, re.S)
    assert block and "test accuracy" in block.group(1)
    edited = re.sub(r"\*\*[\d.]+ %\*\*", "**99.99 %**", block.group(1), count=1)  # the accuracy, by hand
    assert edited != block.group(1)
    copy.write_text(text.replace(block.group(1), edited))
    assert cog("--check", str(copy)).returncode != 0


def test_readme_is_a_short_guide_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 200
    assert "make run" in text and "make test" in text


@pytest.mark.parametrize("path", ["params.yaml", "dvc.yaml", "Makefile", "Dockerfile", "pipeline/prefect.yaml",
                                  *CODE])
def test_comments_carry_no_measurements(path):
    lines = (ROOT / path).read_text().splitlines()
    comments = [(i, line.split("#", 1)[1]) for i, line in enumerate(lines, 1) if "#" in line]
    found = [f"{path}:{i}: #{c.strip()}" for i, c in comments if MEASURED.search(c)]
    assert not found, "measured figures belong in docs/benchmarks.md:\n" + "\n".join(found)



def test_offline_plots_template_inlines_the_scripts_dvc_pins():
    """.dvc/offline-plots.html holds the vega versions DVC's renderer would load from its CDN (refresh it with
    `make plots-template` after a DVC upgrade) and no script from the network."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from plots_template import pinned_versions

    html = (ROOT / ".dvc/offline-plots.html").read_text()
    assert sorted(re.findall(r"/\* ([a-z-]+)@([0-9.]+) \*/", html)) == sorted(pinned_versions())
    assert "<script src" not in html and "{plot_divs}" in html
    assert "html_template = offline-plots.html" in (ROOT / ".dvc/config").read_text()
