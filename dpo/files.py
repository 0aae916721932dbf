"""Writing files: one clear error when a write fails, and exclusive locks that die with their process.

Every stage that writes (the tokenized-data cache, the reference cache, a run's output directory) wraps
its writes in :func:`writing`, so a full disk or a read-only folder ends as one :class:`WriteFailed` that
names the path, says how many bytes were needed where that is known, and carries a note on what is still
intact; the CLI prints it as one paragraph and exits with status 2.

:class:`FileLock` is an OS lock (``flock``) on a small file: the kernel releases it when its process ends
in any way, so a crashed run never leaves a stale lock behind. The holder writes its process id into the
file, so whoever is refused can say who holds it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Errors that mean "the disk (or the user's quota) has no room"; the message then says how much is needed.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# safetensors (Rust) reports an I/O failure as its own error type whose text holds the OS error code.
_RUST_OS_ERROR = re.compile(r"Os \{ code: (\d+)")
# Temporary files and folders are named with this prefix beside their target.
TEMP_PREFIX = ".tmp-"


def format_bytes(count: int) -> str:
    """``1536`` -> ``"1.5 KiB"``: a size as people read it."""
    size = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{count} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class WriteFailed(Exception):
    """A write that the operating system refused (disk full, quota, read-only folder, permissions).

    Attributes:
        path: the file or folder being written.
        cause: the operating system's error.
        what: what was being written ("checkpoint", "reference cache", ...).
        needed: bytes the write needed, when known.
        kept: what is still intact and how to continue; set by whoever knows (the training loop, the cache).
    """

    def __init__(self, path: Path | str, cause: OSError, what: str, needed: int | None = None,
                 kept: str | None = None) -> None:
        super().__init__(str(path))
        self.path = Path(path)
        self.cause = cause
        self.what = what
        self.needed = needed
        self.kept = kept

    @property
    def no_space(self) -> bool:
        return self.cause.errno in _NO_SPACE

    def __str__(self) -> str:
        reason = self.cause.strerror or str(self.cause)
        name = errno.errorcode.get(self.cause.errno or -1)
        text = f"cannot write the {self.what}: {reason.rstrip('.')}{f' ({name})' if name else ''} while writing {self.path}"
        if self.no_space and self.needed is not None:
            text += f"; it needs about {format_bytes(self.needed)} free"
        text += "."
        if self.kept:
            text += f" {self.kept}"
        if self.no_space:
            text += " Free some space on that disk (or point the folder at another one) and run again."
        return text


def os_error_of(exc: BaseException) -> OSError | None:
    """The operating-system error behind ``exc``: itself, or the code inside a safetensors I/O error."""
    if isinstance(exc, OSError):
        return exc
    match = _RUST_OS_ERROR.search(str(exc)) if type(exc).__name__ == "SafetensorError" else None
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


@contextmanager
def writing(path: Path | str, what: str, needed: int | None = None) -> Iterator[None]:
    """Turn an operating-system error raised inside the block into :class:`WriteFailed`.

    Args:
        path: what the block writes (the error's own file name wins when it has one).
        what: what is being written, for the message.
        needed: bytes the block writes, when known.
    """
    try:
        yield
    except WriteFailed:
        raise
    except Exception as exc:
        cause = os_error_of(exc)
        if cause is None:
            raise
        raise WriteFailed(cause.filename or path, cause, what, needed) from exc


# ---------------------------------------------------------------------------------- durable writes


def sha256_of_file(path: Path, block_size: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks (the hash releases the GIL on each block)."""
    digest = hashlib.sha256()
    buffer = bytearray(block_size)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            read = handle.readinto(buffer)
            if not read:
                break
            digest.update(view[:read])
    return digest.hexdigest()


def sync_file(path: Path) -> None:
    """Flush ``path``'s data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX; Windows cannot open folders)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a crash leaves either the old or the new content.

    The text goes to ``.tmp-NAME`` beside it first (one writer at a time: the folder's owner), is
    fsynced, then renamed over ``path``.
    """
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """:func:`write_text_atomic` for bytes (a PNG, say)."""
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}")
    temp.unlink(missing_ok=True)
    try:
        with open(temp, "xb") as handle:
            handle.write(data)
        sync_file(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    sync_dir(path.parent)


# ------------------------------------------------------------------------------------------- locks


class LockHeld(Exception):
    """The lock is held by another process (``holder``: its process id, when it wrote one)."""

    def __init__(self, path: Path, holder: int | None) -> None:
        super().__init__(f"{path} is locked by {describe_holder(holder)}")
        self.path = path
        self.holder = holder


def describe_holder(holder: int | None) -> str:
    return f"process {holder}" if holder is not None else "another process"


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if missing), held until :meth:`release` or process exit.

    The lock belongs to this object's open file: a second ``FileLock`` on the same path, in this process
    or another, is refused (or waits) until the first is released. Where ``flock`` does not exist
    (Windows) locking is skipped.

    Args:
        path: the lock file.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, *, wait: bool = False, on_wait: Callable[[int | None], None] | None = None) -> FileLock:
        """Take the lock.

        Args:
            wait: block until the holder releases it; otherwise raise :class:`LockHeld` at once.
            on_wait: called with the holder's process id before blocking.

        Raises:
            LockHeld: another process holds it and ``wait`` is False.
        """
        try:
            import fcntl
        except ImportError:  # no flock on this platform
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                if not wait:
                    raise LockHeld(self.path, holder) from None
                if on_wait is not None:
                    on_wait(holder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            # Only the holder writes, and only after locking: a refused process reads the current holder.
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the lock
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
