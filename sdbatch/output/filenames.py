"""Image file names from a pattern of [tags], as the WebUI's filename pattern, made safe for
every file system (Windows' reserved names and characters included)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sdbatch.output.infotext import number

TAGS: dict[str, Callable[[Any, dict[str, str]], str]] = {
    "index": lambda r, ctx: f"{r.index:05d}",
    "seed": lambda r, ctx: str(r.seed),
    "prompt_words": lambda r, ctx: " ".join(re.findall(r"[\w]+", r.prompt)[:8]),
    "sampler": lambda r, ctx: r.sampler,
    "scheduler": lambda r, ctx: r.schedule_type,
    "steps": lambda r, ctx: str(r.steps),
    "cfg": lambda r, ctx: number(r.cfg_scale),
    "width": lambda r, ctx: str(r.width),
    "height": lambda r, ctx: str(r.height),
    "model_name": lambda r, ctx: ctx["model_name"],
    "job": lambda r, ctx: ctx["job"],
}
_TAG = re.compile(r"\[([a-z_]+)\]")
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
             *(f"LPT{i}" for i in range(1, 10))}
MAX_BYTES = 150


def check_pattern(pattern: str) -> str | None:
    unknown = [t for t in _TAG.findall(pattern) if t not in TAGS]
    if unknown:
        return f"unknown tag(s) {', '.join(f'[{t}]' for t in unknown)}; tags: " + \
            " ".join(f"[{t}]" for t in TAGS)
    if not _TAG.search(pattern):
        return "needs at least one tag such as [index], or every image gets the same name"
    return None


def safe(name: str) -> str:
    name = _UNSAFE.sub("_", name).strip().rstrip(". ")
    while len(name.encode()) > MAX_BYTES:
        name = name[:-1]
    if not name or name.split(".")[0].upper() in RESERVED:
        name = f"_{name}"
    return name


def file_name(pattern: str, render: Any, ctx: dict[str, str]) -> str:
    return safe(_TAG.sub(lambda m: TAGS[m.group(1)](render, ctx), pattern)) + ".png"


WINDOWS_MAX_PATH = 259  # MAX_PATH (260) less its terminating NUL
TEMP_EXTRA = 14  # atomic.write_bytes' temp file: ".{name}.XXXXXXXX.tmp"


def too_long_on_windows(run_dir: Path, files: Iterable[str]) -> str | None:
    """Where a file of the run (``files``: paths in the run folder, images and the
    intermediates and control maps it will write) would pass Windows' 260-character path
    limit with its temp file's name while it is written, a sentence naming the longest;
    None elsewhere, or where Windows has long paths enabled (LongPathsEnabled, which
    Python honours)."""
    if sys.platform != "win32" or long_paths_enabled():
        return None
    longest = max(files, key=len, default="")
    length = len(str(run_dir.absolute() / longest)) + TEMP_EXTRA
    if length <= WINDOWS_MAX_PATH:
        return None
    return (f"{run_dir.absolute() / longest} would be {length} characters long while it is "
            f"written, over Windows' {WINDOWS_MAX_PATH + 1}-character limit: shorten "
            "run.filename, job.name or run.dir, or enable long paths in Windows "
            "(LongPathsEnabled)")


def long_paths_enabled() -> bool:
    import winreg  # Windows only

    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE,
                            r"SYSTEM\CurrentControlSet\Control\FileSystem") as key:
            return winreg.QueryValueEx(key, "LongPathsEnabled")[0] == 1
    except OSError:
        return False
