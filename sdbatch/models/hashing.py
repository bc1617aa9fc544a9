"""File hashes as the WebUI writes them, computed once per file version.

A multi-GB checkpoint takes tens of seconds to hash; the cache remembers each file's sha256
under its path, size and mtime, so a run hashes a file again only when it changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sdbatch import atomic
from sdbatch.models.tiny import cache_root


def _cache_file() -> Path:
    return cache_root() / "hashes.json"


def _load() -> dict[str, dict]:
    try:
        return json.loads(_cache_file().read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def sha256(path: Path) -> str:
    """sha256 of a whole file, from the cache when path, size and mtime are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache = _load()
    hit = cache.get(str(path))
    if hit and all(hit.get(k) == v for k, v in stamp.items()):
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    cache = _load()  # another process may have added entries meanwhile
    cache[str(path)] = {**stamp, "sha256": digest}
    _cache_file().parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(_cache_file(), json.dumps(cache, indent=1))
    return digest


def folder_sha256(folder: Path) -> str:
    """A diffusers folder's identity: the hash of its files' names and hashes."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        h.update(f"{file.relative_to(folder).as_posix()}\0{sha256(file)}\n".encode())
    return h.hexdigest()


def model_hash(path: Path) -> str:
    """The WebUI's 'Model hash' (AutoV2): the first 10 hex digits of the file's sha256."""
    path = Path(path)
    return (folder_sha256(path) if path.is_dir() else sha256(path))[:10]



def legacy_hash(path: Path) -> str:
    """The WebUI's old 8-digit model hash (sha256 of 64 KiB at 1 MiB into the file), which
    sd-webui-controlnet writes after a ControlNet's name; a folder: its largest file's."""
    path = Path(path)
    if path.is_dir():
        path = max((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
