"""git revision and library versions recorded with results."""

import shutil
import subprocess

import pytest

from lce.provenance import git_revision, versions


def test_outside_a_checkout_is_none(tmp_path):
    assert git_revision(tmp_path) is None


def test_missing_directory_is_none(tmp_path):
    assert git_revision(tmp_path / "absent") is None


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_short_sha_and_dirty_flag(tmp_path):
    def git(*args):
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
            cwd=tmp_path, check=True, capture_output=True, text=True,
        ).stdout.strip()

    git("init", "-q")
    assert git_revision(tmp_path) is None  # no commit yet
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("commit", "-q", "--no-verify", "-m", "first")
    sha = git("rev-parse", "--short", "HEAD")
    (tmp_path / "untracked.txt").write_text("x")
    assert git_revision(tmp_path) == sha
    (tmp_path / "a.txt").write_text("2")
    assert git_revision(tmp_path) == f"{sha}-dirty"


def test_versions():
    found = versions()
    assert set(found) == {"python", "lce", "torch", "transformers", "accelerate", "triton", "peft", "deepspeed"}
    assert found["torch"] and found["python"].count(".") == 2
