"""One process per run folder: an OS file lock (run.lock) and a note of its holder
(run.lock.json: pid, host, start time), so a second process is refused at once, by name.

The OS releases the lock when its process dies (kill -9 included), so a holder that died
leaves only its note, which the next process replaces, saying so. A lock that outlives its
process (a forked child still holds the file, or a file system whose locks do not follow
processes) is stale when its note names a pid of this host that is no longer running: it is
broken and taken over. A holder on another host cannot be checked and is never broken.

The shard tasks of one SLURM submission (executors/slurm.py) share the folder: the driver,
holding run.lock, names the submission allowed in (run.submission.json); each task holds
run.lock.shard-N (its note beside it) for its life and run.lock only for the moment it
checks in. So a process of no submission is refused while a task runs, a task while such a
process runs, and a task of an older submission or a second copy of a running shard always.
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
SUBMISSION = "run.submission.json"  # {"id", "shards"}: the array whose tasks may share it
SHARD = "run.lock.shard-{}"  # held by the task of shard N; its note is SHARD + ".json"
CHECK_IN_WAIT_S = 30  # a task waits this long for run.lock, which other tasks hold briefly


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str
    role: str = ""  # "shard 2 of submission 5f3c..." for an array task

    def __str__(self) -> str:
        role = f"{self.role}, " if self.role else ""
        return f"{role}pid {self.pid} on {self.host}, started {self.started}"

    def stale(self, host: str) -> bool:
        """Its process is known to be gone: of this host, and not running."""
        return self.host == host and not pid_alive(self.pid)


class OtherSubmission(RuntimeError):
    def __init__(self, path: Path, submission: str, current: str | None):
        now = f"submission {current}" if current else "no submission"
        super().__init__(f"{path} now belongs to {now}, not to {submission}: this array "
                         "task is from an older submission (the run was resumed or submitted "
                         "again since); it touched nothing")


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


def read_holder(folder: Path, lock: str = LOCK) -> Holder | None:
    try:
        note = json.loads((folder / f"{lock}.json").read_text(encoding="utf-8"))
        return Holder(int(note["pid"]), str(note["host"]), str(note["started"]),
                      str(note.get("role", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def sanction(folder: Path, submission: str, shards: int) -> None:
    """Let the tasks of ``submission`` into the folder (and no older submission's): written
    by the driver while it holds run.lock."""
    atomic.write_text(folder / SUBMISSION, json.dumps({"id": submission, "shards": shards}))


def _submission(folder: Path) -> str | None:
    try:
        return str(json.loads((folder / SUBMISSION).read_text(encoding="utf-8"))["id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _take(folder: Path, name: str, timeout: float, host: str) -> FileLock:
    """The lock file ``name`` of ``folder``, breaking it when stale (see the module)."""
    seen = _inode(folder / name)  # before trying: the file a stale holder may hold
    lock = FileLock(folder / name, timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        holder = read_holder(folder, name)
        if holder is None or not holder.stale(host):
            raise RunFolderBusy(folder, holder) from None
        lock = _break(folder, name, holder, seen)
    return lock


def _break(folder: Path, name: str, holder: Holder, seen: int | None) -> FileLock:
    """Take a stale lock over: one breaker at a time (``name``.break), and only the very
    file found held: one replaced meanwhile was broken by another process, which holds
    it now (a second break would make two holders)."""
    path = folder / name
    with FileLock(folder / f"{name}.break", timeout=CHECK_IN_WAIT_S):
        if _inode(path) != seen:
            raise RunFolderBusy(folder, read_holder(folder, name))
        try:
            path.unlink(missing_ok=True)
        except OSError:  # Windows keeps a file open elsewhere: its holder is alive
            raise RunFolderBusy(folder, holder) from None
        lock = FileLock(path, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise RunFolderBusy(folder, read_holder(folder, name)) from None
    return lock


def _refuse_running_shards(folder: Path, host: str) -> None:
    for file in folder.glob(SHARD.format("*")):
        if file.suffix == ".json":
            continue
        probe = FileLock(file, timeout=0)
        try:
            probe.acquire()
        except Timeout:
            holder = read_holder(folder, file.name)
            if holder is None or not holder.stale(host):
                raise RunFolderBusy(folder, holder) from None
        else:
            probe.release()


class RunLock:
    """Held from before the first write to the run folder to after the last; ``shard``
    (submission id, shard number) takes it as one task of that submission."""

    def __init__(self, folder: Path, started: str, shard: tuple[str, int] | None = None):
        self.folder = folder
        self.shard = shard
        role = f"shard {shard[1]} of submission {shard[0]}" if shard else ""
        self.me = Holder(os.getpid(), socket.gethostname(), started, role)
        self.took_over: Holder | None = None  # a dead holder whose lock or note was left
        self.name = LOCK if shard is None else SHARD.format(shard[1])
        self._lock: FileLock | None = None

    def acquire(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        host = self.me.host
        if self.shard is None:
            self._lock = _take(self.folder, LOCK, 0, host)
            try:
                _refuse_running_shards(self.folder, host)
            except RunFolderBusy:
                self._lock.release()
                raise
        else:
            gate = _take(self.folder, LOCK, CHECK_IN_WAIT_S, host)
            try:
                (self.folder / NOTE).unlink(missing_ok=True)  # a dead holder's: we hold it
                current = _submission(self.folder)
                if current != self.shard[0]:
                    raise OtherSubmission(self.folder, self.shard[0], current)
                self._lock = _take(self.folder, self.name, 0, host)
            finally:
                gate.release()
        previous = read_holder(self.folder, self.name)
        if previous is not None and previous != self.me:
            self.took_over = previous
        atomic.write_text(self.folder / f"{self.name}.json", json.dumps(self.me.__dict__))
        return self

    def release(self) -> None:
        (self.folder / f"{self.name}.json").unlink(missing_ok=True)
        self._lock.release()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
