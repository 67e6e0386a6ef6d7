"""`.ci/buf-breaking` (run by `make test`) on throwaway git histories of this repo's protos.

A breaking change fails it; a compatible one passes; the first commit, and a shallow clone
that cannot fetch its parent, are skipped with a notice instead of failing spuriously.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / ".ci" / "buf-breaking"
BUF = ROOT / "node_modules" / ".bin" / "buf"
PROTO = Path("protos/umbra/connections/v1/connections.proto")
# SearchRequest's one field (other messages have an umbral_name = 1 too).
FIELD = "  // Handle to look for (any letter case).\n  string umbral_name = 1;"
RENAMED = "  // Handle to look for (any letter case).\n  string handle = 1;"
ADDED = f"{FIELD}\n  // A new field.\n  string note = 2;"

pytestmark = pytest.mark.skipif(not BUF.exists(), reason="buf is installed by `make install`")


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo), *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


def run_check(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=repo,
        env={"BUF": str(BUF), "PATH": "/usr/bin:/bin", "HOME": str(repo.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository whose one commit holds this checkout's buf.yaml and protos/."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "buf.yaml", repo / "buf.yaml")
    shutil.copytree(ROOT / "protos", repo / "protos")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "first")
    return repo


def commit_edit(repo: Path, old: str, new: str) -> None:
    path = repo / PROTO
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    git(repo, "commit", "-qam", "edit")


def test_the_first_commit_is_skipped(repo: Path) -> None:
    result = run_check(repo)
    assert result.returncode == 0, result.stderr
    assert "SKIPPED, HEAD is the first commit" in result.stderr


def test_a_compatible_change_passes(repo: Path) -> None:
    commit_edit(repo, FIELD, ADDED)
    result = run_check(repo)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "buf breaking: protos/ against" in result.stdout


def test_a_renamed_field_fails(repo: Path) -> None:
    commit_edit(repo, FIELD, RENAMED)
    result = run_check(repo)
    assert result.returncode != 0
    assert 'changed name from "umbral_name" to "handle"' in result.stdout


def test_an_uncommitted_breaking_edit_fails_too(repo: Path) -> None:
    commit_edit(repo, FIELD, ADDED)
    path = repo / PROTO
    path.write_text(path.read_text().replace(FIELD, RENAMED))
    result = run_check(repo)
    assert result.returncode != 0
    assert 'changed name from "umbral_name" to "handle"' in result.stdout


def test_a_shallow_clone_fetches_the_parent(repo: Path, tmp_path: Path) -> None:
    commit_edit(repo, FIELD, RENAMED)
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--depth", "1", f"file://{repo}", str(clone))
    result = run_check(clone)
    assert result.returncode != 0, result.stderr
    assert 'changed name from "umbral_name" to "handle"' in result.stdout


def test_a_shallow_clone_without_its_origin_is_skipped(repo: Path, tmp_path: Path) -> None:
    commit_edit(repo, FIELD, ADDED)
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--depth", "1", f"file://{repo}", str(clone))
    shutil.rmtree(repo)
    result = run_check(clone)
    assert result.returncode == 0, result.stderr
    assert "SKIPPED, shallow clone" in result.stderr
