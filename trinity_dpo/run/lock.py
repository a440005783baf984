"""One run at a time in a run folder: `run.lock`, held by rank 0 of the run that trains there.

The lock is an flock on the file, so the kernel drops it when its process dies, however it dies; the file's text
names the holder (pid, host, start time) for the message another run prints. A lock file that nobody holds was
left by a run that crashed: on the same host it is taken over with a warning. Left by another host, it is not:
this host cannot tell whether that run still goes (on storage whose locks do not reach across hosts, it might),
so the user is asked to delete it. The lock belongs to the process and is released when it exits, or by
`release`; a process that holds a folder's lock may take it again (tests run several runs in one process).
"""
from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import RunFolderError

log = logging.getLogger(__name__)

NAME = "run.lock"
_held: dict[Path, int] = {}  # lock file -> open descriptor holding its flock


def acquire(run_dir: Path) -> None:
    """Hold `run_dir`'s lock for this process, or raise RunFolderError naming the run that holds it."""
    path = (run_dir / NAME).resolve()
    if path in _held:
        return
    fd, locked = _open_locked(path)
    try:
        holder = _read(fd)
        for _ in range(20):  # a holder that has just taken the lock writes its name a moment later
            if holder or locked is not False:
                break
            time.sleep(0.1)
            holder = _read(fd)
        if locked is False:
            raise RunFolderError(f"run folder {run_dir} is in use by another run ({_describe(holder)}); wait for it to "
                              "end, or give this run another `name`")
        # A holder with this pid on another host is another run (containers reuse small pids): checked like any.
        if holder and (holder.get("pid"), holder.get("host")) != (os.getpid(), socket.gethostname()):
            _take_over(run_dir, path, holder, flock_works=locked)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    _held[path] = fd


def release(run_dir: Path) -> None:
    path = (run_dir / NAME).resolve()
    fd = _held.pop(path, None)
    if fd is not None:
        # Removed while still locked: a process that opened the old file finds it gone after the unlock and opens
        # the new one (`_open_locked`), so two runs never hold two different files.
        path.unlink(missing_ok=True)
        os.close(fd)


def held() -> list[Path]:
    return list(_held)


@atexit.register
def _release_all() -> None:
    for path in list(_held):
        release(path.parent)


def _open_locked(path: Path) -> tuple[int, bool | None]:
    """An open descriptor of the lock file and whether its flock was taken (True), is held by another process
    (False), or cannot be had on this storage (None: flock unsupported, the pid and host are all there is)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            return fd, False
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            return fd, None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, locked
        os.close(fd)  # its holder released it between our open and our lock: lock the file that is there now


def _take_over(run_dir: Path, path: Path, holder: dict, flock_works: bool | None) -> None:
    """Take over a lock nobody holds, left by a crashed run on this host; refuse one from another host."""
    if holder.get("host") != socket.gethostname():
        raise RunFolderError(f"run folder {run_dir} is locked by a run on another host ({_describe(holder)}), which "
                          f"this host cannot check; if that run has ended, delete {path} and run again")
    if not flock_works and _alive(holder.get("pid")):
        raise RunFolderError(f"run folder {run_dir} is in use by another run ({_describe(holder)}); wait for it to "
                          "end, or give this run another `name`")
    log.warning("run folder %s: taking over the lock of a run that no longer runs (%s)", run_dir, _describe(holder))


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _read(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "it is starting"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
