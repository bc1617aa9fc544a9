"""Which file (or command-line override) a key of the composed config came from, so every
error names where to fix it."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sdbatch.job_folders import job_dirs


def _has(raw: Any, parts: list[str]) -> bool:
    for part in parts:
        if isinstance(raw, list) and part.isdigit() and int(part) < len(raw):
            raw = raw[int(part)]
        elif isinstance(raw, dict) and part in raw:
            raw = raw[part]
        else:
            return False
    return True


def shown(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _load(path: Path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path)) or {}


class Origins:
    """origin(key) -> 'command line: params.seed=[1,2]' or the file that set the key."""

    def __init__(self, overrides: list[str], choices: dict[str, str | None]):
        # a group choice (+job=NAME, model=sd15) sets no key itself: the file it picks does
        self.overrides = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in choices]
        self.sources: list[tuple[str, str, dict]] = []  # (label, key prefix, raw yaml)
        job = choices.get("job")
        if job:
            for folder in job_dirs():
                file = folder / f"{job}.yaml"
                if file.is_file():
                    self.sources.append((shown(file), "", _load(file)))
                    break
        conf = resources.files("sdbatch.conf")
        for group, choice in choices.items():
            if group in ("job",) or group.startswith("hydra") or choice is None:
                continue
            file = Path(str(conf.joinpath(group, f"{choice}.yaml")))
            if file.is_file():
                self.sources.append((shown(file), f"{group}.", _load(file)))
        self.sources.append((shown(Path(str(conf.joinpath("config.yaml")))), "",
                             _load(Path(str(conf.joinpath("config.yaml"))))))

    def __call__(self, key: str) -> str:
        # post[1].inpaint.mask -> post.1.inpaint.mask (a list of mappings); params.seed[1]
        # -> params.seed (an item of an axis: the key's own place)
        key = re.sub(r"\[\d+\]$", "", re.sub(r"\[(\d+)\]\.", r".\1.", key))
        for override in self.overrides:
            name = override.split("=", 1)[0].lstrip("+~")
            if name == key or key.startswith(f"{name}.") or name.startswith(f"{key}."):
                return f"command line '{override}'"
        for label, prefix, raw in self.sources:
            if key.startswith(prefix) and _has(raw, key[len(prefix):].split(".")):
                return label
        return "default"
