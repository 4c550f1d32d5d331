import subprocess

import pytest

from cnnpipe.bench.machine import source_revision


@pytest.fixture(autouse=True)
def plain_git(monkeypatch, tmp_path):
    """No user or system git settings (signing, hooks), and no repository above tmp_path."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.delenv("GIT_DIR", raising=False)


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_source_revision_names_the_commit_and_marks_changed_code(tmp_path):
    repo = tmp_path / "code"
    (repo / "src" / "pkg").mkdir(parents=True)
    (repo / "metrics").mkdir()
    (repo / "src" / "pkg" / "mod.py").write_text("x = 1\n")
    (repo / "metrics" / "eval.json").write_text("{}\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git(repo, "rev-parse", "--short=12", "HEAD")
    where = repo / "src" / "pkg"
    assert source_revision(where) == head
    (repo / "src" / "pkg" / "new.py").write_text("untracked files do not count\n")
    (repo / "metrics" / "eval.json").write_text('{"acc": 0.9}\n')  # results a run rewrites do not count
    assert source_revision(where) == head
    (repo / "src" / "pkg" / "mod.py").write_text("x = 2\n")
    assert source_revision(where) == head + "-dirty"


def test_source_revision_is_none_outside_a_checkout(tmp_path):
    assert source_revision(tmp_path) is None
