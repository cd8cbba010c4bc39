"""A run directory belongs to one run: the lock, refusing or replacing another run, temp-file clean-up."""

import os
import signal
import subprocess
import sys
import time

import pytest

from sclref import rundir
from sclref.errors import InputError
from sclref.rundir import LOCK, RUN_FILES, RunDirectoryError, check_writable, claim, is_held


def test_claim_creates_the_directory_and_holds_it_while_the_block_runs(tmp_path):
    out = tmp_path / "a" / "b"
    assert not is_held(out)
    with claim(out) as directory:
        assert directory == out and out.is_dir() and (out / LOCK).exists()
        assert is_held(out)
    assert not is_held(out)


def test_a_second_writer_is_refused_at_once(tmp_path):
    with claim(tmp_path):
        t0 = time.perf_counter()
        with pytest.raises(RunDirectoryError, match="another sclref process is writing"):
            with claim(tmp_path, "keep"):
                pass
        assert time.perf_counter() - t0 < 1.0
    with claim(tmp_path, "keep"):  # free again once the first is done
        pass


def test_the_lock_goes_with_a_killed_writer(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom sclref.rundir import claim\n"
         f"with claim({str(tmp_path)!r}):\n    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_held(tmp_path)
        with pytest.raises(RunDirectoryError):
            with claim(tmp_path, "keep"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    with claim(tmp_path, "keep"):
        pass


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_fresh_run_refuses_a_directory_holding_another_run(tmp_path, name):
    (tmp_path / name).write_bytes(b"old")
    with pytest.raises(RunDirectoryError, match=f"holds another run \\({name}\\).*--replace"):
        with claim(tmp_path):
            pass
    assert (tmp_path / name).read_bytes() == b"old"


def test_replace_deletes_every_file_of_the_old_run_and_nothing_else(tmp_path):
    for name in RUN_FILES:
        (tmp_path / name).write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("mine")
    with claim(tmp_path, "replace"):
        assert not any((tmp_path / name).exists() for name in RUN_FILES)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_keep_leaves_the_run_as_it_is(tmp_path):
    (tmp_path / "checkpoint.npz").write_bytes(b"ckpt")
    with claim(tmp_path, "keep"):
        assert (tmp_path / "checkpoint.npz").read_bytes() == b"ckpt"


def test_temp_files_of_a_killed_write_are_removed(tmp_path):
    (tmp_path / ".checkpoint.npz.abc123.tmp").write_bytes(b"half")
    (tmp_path / ".metrics.json.x.tmp").write_bytes(b"half")
    (tmp_path / "keep.tmp").write_bytes(b"not ours")
    with claim(tmp_path, "keep"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK, "keep.tmp"]


def test_an_unusable_place_is_an_error_before_any_work(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(RunDirectoryError, match="file"):
            check_writable(bad)
        with pytest.raises(RunDirectoryError):
            with claim(bad):
                pass
    check_writable(tmp_path / "new" / "deeper")  # creatable: fine, and still not created
    assert not (tmp_path / "new").exists()


def test_a_read_only_parent_is_refused(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir(mode=0o500)
    # root may write anywhere, so the permission answer is the kernel's for a plain user
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != os.fspath(tmp_path / "ro"))
    with pytest.raises(RunDirectoryError, match="not writable"):
        check_writable(tmp_path / "ro" / "run")


def test_run_directory_errors_are_input_errors_and_bad_modes_are_refused(tmp_path):
    assert issubclass(RunDirectoryError, InputError)
    with pytest.raises(ValueError, match="existing must be"):
        with rundir.claim(tmp_path, "overwrite"):
            pass
