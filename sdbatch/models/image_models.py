"""The image model files of a run (face restorers: GFPGAN, CodeFormer), each identified
(architecture, sha256) before any work and loaded once, on the run's device, when a stage
first needs it. Files are read by spandrel_files, under the checkpoints' pickle rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sdbatch.models import hashing, spandrel_files


@dataclass(frozen=True)
class ImageModelFile:
    path: Path
    sha256: str
    architecture: str  # spandrel's id: "GFPGAN", "CodeFormer", ...


def identify(path: Path, allow_pickle: bool) -> ImageModelFile:
    """The file's architecture (spandrel reads it from the weights) and hash; a file
    spandrel does not know, or that needs unpickling without the opt-in, is refused."""
    architecture = spandrel_files.load(path, allow_pickle).architecture.id
    return ImageModelFile(Path(path), hashing.sha256(path), architecture)


class ImageModels:
    """The run's image models by sha256, each loaded on first use and kept on ``device`` in
    float32 (face restorers are small; their blends are made in float32)."""

    def __init__(self, files: dict[str, ImageModelFile], device: torch.device,
                 allow_pickle: bool = False):
        self.files, self.device = files, device
        self.loaded = spandrel_files.Loaded(device, torch.float32, allow_pickle)

    def get(self, sha256: str) -> torch.nn.Module:
        return self.loaded.get(self.files[sha256].path).model

    def release(self) -> None:
        self.loaded.release()
