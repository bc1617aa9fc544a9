"""One process per run folder: an OS file lock (run.lock) and a note of its holder
(run.lock.json: pid, host, start time), so a second process is refused at once, by name.

The OS releases the lock when its process dies (kill -9 included), so a holder that died
leaves only its note, which the next process replaces, saying so. A lock that outlives its
process (a forked child still holds the file, or a file system whose locks do not follow
processes) is stale when its note names a pid of this host that is no longer running: it is
broken and taken over. A holder on another host cannot be checked and is never broken.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from sdbatch import atomic

LOCK, NOTE = "run.lock", "run.lock.json"


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str

    def __str__(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"


class RunFolderBusy(RuntimeError):
    def __init__(self, path: Path, holder: Holder | None):
        self.holder = holder
        who = str(holder) if holder else "a process that has not yet said who it is"
        super().__init__(f"{path} is in use by {who}; wait for it to finish, or give "
                         "another run.dir")


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this pid (Windows: os.kill would end it)."""
    if pid <= 0:
        return False
    if sys.platform == "win32":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by another user
    return True


def read_holder(folder: Path) -> Holder | None:
    try:
        note = json.loads((folder / NOTE).read_text(encoding="utf-8"))
        return Holder(int(note["pid"]), str(note["host"]), str(note["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """Held from before the first write to the run folder to after the last."""

    def __init__(self, folder: Path, started: str):
        self.folder = folder
        self.me = Holder(os.getpid(), socket.gethostname(), started)
        self.took_over: Holder | None = None  # a dead holder whose lock or note was left
        self._lock = FileLock(folder / LOCK, timeout=0)

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            holder = read_holder(self.folder)
            if holder is None or holder.host != self.me.host or pid_alive(holder.pid):
                raise RunFolderBusy(self.folder, holder) from None
            (self.folder / LOCK).unlink(missing_ok=True)  # stale: break it
            self._lock = FileLock(self.folder / LOCK, timeout=0)
            try:
                self._lock.acquire()
            except Timeout:
                raise RunFolderBusy(self.folder, read_holder(self.folder)) from None
        previous = read_holder(self.folder)
        if previous is not None and previous != self.me:
            self.took_over = previous
        atomic.write_text(self.folder / NOTE, json.dumps(self.me.__dict__))
        return self

    def release(self) -> None:
        (self.folder / NOTE).unlink(missing_ok=True)
        self._lock.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
