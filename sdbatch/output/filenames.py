"""Image file names from a pattern of [tags], as the WebUI's filename pattern, made safe for
every file system (Windows' reserved names and characters included)."""

from __future__ import annotations

import re
from collections.abc import Callable
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
