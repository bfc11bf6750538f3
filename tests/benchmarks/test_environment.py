"""benchmarks.environment.git_commit: the commit a result names is the code that ran."""

import subprocess

import pytest

from benchmarks.environment import git_commit


def test_commit_is_marked_modified_when_tracked_files_differ(tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPOPT_GIT_COMMIT", raising=False)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    try:
        subprocess.run([*git, "init", "-q"], check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not available")
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = git_commit(str(tmp_path))
    assert head and "+" not in head
    (tmp_path / "new.py").write_text("untracked files do not count\n")
    assert git_commit(str(tmp_path)) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_commit(str(tmp_path)) == head + "+modified"
    monkeypatch.setenv("DEEPOPT_GIT_COMMIT", "f00ba47")
    assert git_commit(str(tmp_path)) == "f00ba47"
