"""mugs_fast.files: write a temporary, rename it on success, remove it on failure; stale temporaries."""

import os

import pytest
from prep_testing import dead_pid

from mugs_fast.files import atomic_path, atomic_paths, remove_stale_temporaries, temporary_path


def test_temporary_names_are_hidden_and_carry_the_pid(tmp_path):
    pid = os.getpid()
    assert temporary_path(tmp_path / "a.pth") == tmp_path / f".a.pth.tmp-{pid}"
    assert temporary_path(tmp_path / "a.safetensors", keep_suffix=True) == tmp_path / f".a.tmp-{pid}.safetensors"


def test_a_finished_block_renames_over_the_target(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with atomic_path(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"  # nothing visible before the block ends
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_a_failed_block_keeps_the_target_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="mid-write"), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("failed mid-write")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_paths_are_renamed_in_order_and_a_failed_rename_renames_nothing_after_it(tmp_path, monkeypatch):
    first, second = tmp_path / "data.bin", tmp_path / "data.report"
    renamed, real_replace = [], os.replace

    def replace(src, dst):
        renamed.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with atomic_paths([first, second]) as temporaries:
        for tmp in temporaries:
            tmp.write_text(tmp.name)
    assert renamed == ["data.bin", "data.report"]

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"), atomic_paths([tmp_path / "x", tmp_path / "y"]) as temporaries:
        for tmp in temporaries:
            tmp.write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.bin", "data.report"]


def test_only_the_temporaries_of_gone_processes_that_match_are_removed(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    stale = [f".checkpoint.pth.tmp-{dead}", f".checkpoint0050.pth.tmp-{dead}", f".checkpoint.pth.tmp-{os.getpid()}"]
    kept = [f".checkpoint.pth.tmp-{alive}", f".other.pth.tmp-{dead}", ".checkpoint.pth.tmp-notapid", "checkpoint.pth"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"partial")
    removed = remove_stale_temporaries(tmp_path, "checkpoint*.pth")
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
