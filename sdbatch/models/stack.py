"""A job's model section -> a resolved stack spec (checked up front) -> a loaded pipeline.

Resolving checks that every file exists and computes the stack's identity (its content
hash), which goes into every content key; loading happens later, once per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sdbatch.models import hashing, tiny
from sdbatch.schema import Model, Problem

EMBEDDED = {"tiny": tiny.ensure}


@dataclass(frozen=True)
class StackSpec:
    name: str  # the WebUI's "Model": the checkpoint's stem
    path: Path
    dtype: str

    @property
    def model_hash(self) -> str:
        return hashing.model_hash(self.path)

    @property
    def identity(self) -> str:
        return f"{self.model_hash}:{self.dtype}"


def resolve(model: Model, origin=lambda key: "the job") -> tuple[StackSpec | None, list[Problem]]:
    """The spec for a job's model section, or the problems that stop it."""
    if model.checkpoint in EMBEDDED:
        return StackSpec(model.checkpoint, EMBEDDED[model.checkpoint](), model.dtype), []
    path = Path(model.checkpoint).expanduser()
    key = "model.checkpoint"
    if not path.exists():
        return None, [Problem(key, f"no such file or folder: {path}; give a diffusers folder or "
                              f"'{next(iter(EMBEDDED))}' (the embedded model)", origin(key))]
    if not (path / "model_index.json").exists():
        return None, [Problem(key, f"{path} is not a diffusers pipeline folder (it has no "
                              "model_index.json)", origin(key))]
    return StackSpec(path.name, path, model.dtype), []


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def quiet_libraries() -> None:
    """diffusers' and transformers' own loading bars and notices would drown sdbatch's."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@dataclass
class Stack:
    spec: StackSpec
    pipe: Any
    scheduler_config: dict[str, Any]
    device: torch.device
    dtype: torch.dtype


def load(spec: StackSpec, device: torch.device) -> Stack:
    """Load a diffusers folder fully offline, in the stack's dtype, on the device."""
    quiet_libraries()
    from diffusers import StableDiffusionPipeline

    dtype = pick_dtype(spec.dtype, device)
    pipe = StableDiffusionPipeline.from_pretrained(
        spec.path, dtype=dtype, local_files_only=True, safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return Stack(spec, pipe, dict(pipe.scheduler.config), device, dtype)
