"""manifest.jsonl: one line per image attempt, appended and flushed as each image lands.

The last line for an image wins. A line torn by a kill (cut anywhere, inside a multi-byte
character too) is dropped on reading and cut off before the next append, so the next line
starts on a fresh line and the file is valid JSON lines again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sdbatch import atomic


def read(path: Path) -> dict[int, dict[str, Any]]:
    entries: dict[int, dict[str, Any]] = {}
    if not path.exists():
        return entries
    for line in path.read_bytes().split(b"\n"):
        try:
            entry = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue  # torn by a kill (the last line), or empty
        if isinstance(entry, dict) and isinstance(entry.get("index"), int):
            entries[entry["index"]] = entry
    return entries


class Manifest:
    def __init__(self, path: Path):
        self.path = path
        self._cut_torn_tail()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held for the run

    def _cut_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def compact(self) -> None:
        """Rewrite as one line per image in index order (at the end of a run)."""
        self.close()
        entries = read(self.path)
        atomic.write_text(self.path, "".join(
            json.dumps(entries[i], sort_keys=True, ensure_ascii=False) + "\n"
            for i in sorted(entries)))
