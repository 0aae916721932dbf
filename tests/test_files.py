"""Writing files: the one-paragraph write error, locks that name their holder and die with it, atomic text."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dpo.files import FileLock, LockHeld, WriteFailed, format_bytes, os_error_of, write_text_atomic, writing

ROOT = Path(__file__).resolve().parents[1]


def test_a_full_disk_names_the_path_the_bytes_needed_and_what_is_kept(tmp_path):
    with pytest.raises(WriteFailed) as info:
        with writing(tmp_path / "folder", "checkpoint", needed=3 * 1024 * 1024):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "folder" / "rng.json"))
    info.value.kept = "The last checkpoint, X, is intact."
    message = str(info.value)
    assert message == (f"cannot write the checkpoint: No space left on device (ENOSPC) while writing "
                       f"{tmp_path / 'folder' / 'rng.json'}; it needs about 3.0 MiB free. The last checkpoint, X, "
                       "is intact. Free some space on that disk (or point the folder at another one) and run again.")
    assert "\n" not in message


def test_other_write_errors_name_the_folder_when_the_error_names_no_file(tmp_path):
    with pytest.raises(WriteFailed) as info:
        with writing(tmp_path / "cache", "reference cache", needed=10):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert str(info.value) == (f"cannot write the reference cache: Permission denied (EACCES) while writing "
                               f"{tmp_path / 'cache'}.")  # no byte count: space is not the problem


def test_errors_that_are_not_about_the_disk_pass_through(tmp_path):
    with pytest.raises(ValueError, match="a bug"):
        with writing(tmp_path, "checkpoint"):
            raise ValueError("a bug")


def test_a_safetensors_io_error_is_read_as_the_os_error_it_holds():
    class SafetensorError(Exception):
        pass

    cause = os_error_of(SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                        'message: "No space left on device" })'))
    assert cause is not None and cause.errno == errno.ENOSPC
    assert os_error_of(SafetensorError("header too large")) is None
    assert os_error_of(RuntimeError("Os { code: 28")) is None


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 1536, 5 * 1024**3)] == ["0 bytes", "1023 bytes", "1.5 KiB", "5.0 GiB"]


def test_a_held_lock_is_refused_naming_its_holder_and_a_waiter_gets_it_after(tmp_path):
    path = tmp_path / "x.lock"
    first = FileLock(path).acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    with pytest.raises(LockHeld) as info:
        FileLock(path).acquire()  # another open file of the same lock, as another process has
    assert info.value.holder == os.getpid()
    told, got = [], []

    def wait():
        got.append(FileLock(path).acquire(wait=True, on_wait=told.append))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and told == [os.getpid()]
    first.release()
    waiter.join(timeout=10)
    assert got and not waiter.is_alive()
    got[0].release()


def test_a_killed_holder_leaves_no_lock(tmp_path):
    path = tmp_path / "x.lock"
    code = f"from dpo.files import FileLock; FileLock({str(path)!r}).acquire(); import os; os.kill(os.getpid(), 9)"
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.wait(timeout=60) == -9 and path.read_text() == f"{child.pid}\n"
    FileLock(path).acquire().release()  # free again: the kernel released it with the process


def test_write_text_atomic_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "recipe.yaml"
    target.write_text("old")
    write_text_atomic(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]
