"""Writes that never leave half a file: write a temp file beside the target, fsync, rename."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

WINDOWS = sys.platform == "win32"
REPLACE_TRIES = 8  # Windows: waits of 10 ms doubling, 1.3 s in all


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's files are owner-only


def write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if not WINDOWS:  # a run folder is shared: a web server, a teammate, a group folder
            os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _replace(tmp: str, path: Path) -> None:
    """os.replace. On Windows a target that another process holds open (`sdbatch ls` or
    the gallery reading run.json, an antivirus scan) refuses the rename for a moment: it
    is tried again, with a growing wait."""
    for attempt in range(REPLACE_TRIES):
        try:
            os.replace(tmp, path)
            return
        except PermissionError:
            if not WINDOWS or attempt == REPLACE_TRIES - 1:
                raise
            time.sleep(0.01 * 2**attempt)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


STALE_TEMP_S = 3600  # no single write takes this long


def remove_stale_temps(folder: Path) -> None:
    """Temp files left by a killed process; their targets were never replaced. Only old
    ones: the shard tasks of a SLURM array write into one folder, and a younger temp may be
    another task's write in flight."""
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink(missing_ok=True)
        except FileNotFoundError:
            continue  # its writer renamed it meanwhile


def build_folder(folder: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``folder``, built by ``build`` into a temp folder and renamed into place, unless its
    ``marker`` file is already there: a concurrent builder never sees half a folder, and the
    loser of a race keeps the winner's (identical) folder."""
    if (folder / marker).exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
