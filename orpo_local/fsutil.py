"""Write files and folders so that they appear whole or not at all; tell whether a process holds a folder.

    write_atomic(path, text)             # temporary file + fsync + rename: a reader sees the old or the new text
    with replace_folder(target) as tmp:  # build a folder in tmp; it replaces target only when the block succeeds
    with hold_lock(folder / ".lock"):    # released by the kernel when the process dies, even by SIGKILL
    is_locked(folder / ".lock")          # True while some process (this one included) holds it
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no flock; a lock file holding the owner's pid stands in for it
    fcntl = None

DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class Locked(RuntimeError):
    """Another process (or another job of this one) holds the lock."""


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write `data` to `path` through a temporary file beside it, flushed to disk, then renamed over it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644)  # mkstemp's is 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def replace_folder(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target`, on any error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp's is 0700; the folder it becomes is an ordinary one
    try:
        yield tmp
        swap_folder(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_folder(new: Path, target: Path) -> None:
    """Put folder `new` in the place of `target`. A folder cannot be renamed over a full one, so the old
    one is renamed aside first: only between the two renames is neither in place."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def hold_lock(path: str | Path, error: type[Exception] = Locked) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the block; `error` if it is held.

    flock locks belong to an open file, so the kernel drops them when the process dies however it dies,
    and a second open in the same process conflicts too (one UI server, two jobs on one run)."""
    path = Path(path)
    fh = path.open("a+")
    try:
        if fcntl is not None:
            for attempt in range(20):  # a reader's `is_locked` holds a shared lock for microseconds
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if attempt == 19:
                        raise error(f"{path.parent}: in use by another process (pid {_owner(path) or '?'})") from None
                    time.sleep(0.05)
        elif _pid_alive(_owner(path)):
            raise error(f"{path.parent}: in use by another process (pid {_owner(path)})")
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()  # releases the flock


def is_locked(path: str | Path) -> bool:
    """True while a process holds the lock of `hold_lock(path)`; never creates the file."""
    path = Path(path)
    if not path.exists():
        return False
    if fcntl is None:
        return _pid_alive(_owner(path))
    with path.open("r") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return False


def _owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def folder_bytes(path: str | Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_FULL
