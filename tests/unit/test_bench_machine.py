import subprocess

from cnnpipe.bench.machine import source_revision


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_source_revision_names_the_commit_and_marks_uncommitted_changes(tmp_path):
    repo = tmp_path / "code"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "mod.py").write_text("x = 1\n")
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git(repo, "rev-parse", "--short=12", "HEAD")
    assert source_revision(repo / "pkg") == head
    (repo / "pkg" / "new.py").write_text("untracked files do not count\n")
    assert source_revision(repo / "pkg") == head
    (repo / "pkg" / "mod.py").write_text("x = 2\n")
    assert source_revision(repo / "pkg") == head + "-dirty"


def test_source_revision_is_none_outside_a_checkout(tmp_path):
    assert source_revision(tmp_path) is None
