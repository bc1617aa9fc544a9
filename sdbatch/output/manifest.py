"""manifest.jsonl: one line per image attempt, appended and flushed as each image lands.

The last line for an image wins. A line torn by a kill (cut anywhere, inside a multi-byte
character too) is dropped on reading and cut off before the next append, so the next line
starts on a fresh line and the file is valid JSON lines again.

Several processes may append (the shard tasks of a SLURM array): each append and the
compaction hold manifest.jsonl.lock, and an append opens the file afresh, so it lands after
every line before it, also after a compaction replaced the file, also over NFS (its
close-to-open consistency).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from sdbatch import atomic


def read(path: Path) -> dict[int, dict[str, Any]]:
    entries: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return entries
    for line in path.read_bytes().split(b"\n"):
        if (entry := read_line(line)) is not None:
            entries[entry["index"]] = entry
    return entries


GONE = "its file is gone from the run folder; `sdbatch resume` renders it again"


def present(run_dir: Path, entry: dict[str, Any]) -> dict[str, Any]:
    """An entry as the folder holds it now: an image whose file was deleted is "missing",
    not ok (the reports say what is there)."""
    if entry.get("status") == "ok" and not (run_dir / str(entry.get("file", ""))).is_file():
        return {**entry, "status": "missing", "error": GONE}
    return entry


def read_line(line: bytes) -> dict[str, Any] | None:
    """One line's entry; None for a line torn by a kill (the last one) or empty."""
    try:
        entry = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("index"), int) else None


class Manifest:
    def __init__(self, path: Path):
        self.path = path
        self._lock = FileLock(path.with_name(path.name + ".lock"))

    def _cut_torn_tail(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            data = self.path.read_bytes()
            tail = data.rfind(b"\n") + 1
            if read_line(data[tail:]) is not None:  # whole but for its newline, and read()
                f.write(b"\n")                      # counts it: kept
            else:
                f.truncate(tail)

    def append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            self._cut_torn_tail()
            with open(self.path, "ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())

    def compact(self) -> None:
        """Rewrite as one line per image in index order (at the end of a run)."""
        with self._lock:
            entries = read(self.path)
            atomic.write_text(self.path, "".join(
                json.dumps(entries[i], sort_keys=True, ensure_ascii=False) + "\n"
                for i in sorted(entries)))
