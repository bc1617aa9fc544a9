"""Stage outputs that later calls take as input, kept under their content key: in memory
within a budget, and on disk in the run folder (written atomically), so a resumed run
does not draw a finished base pass again and an image waits for no recomputation.

``intermediates/<key>.png`` holds the picture (lossless) and, in a text chunk, what its
chain's stages found about it; ``<key>.safetensors`` its latents where it has them. The
folder goes when the run completes, unless the user keeps it.
"""

from __future__ import annotations

import io
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin
from safetensors.torch import load, save

from sdbatch import atomic
from sdbatch.output.writer import WriteError
from sdbatch.stages.picture import Picture

FOLDER = "intermediates"
FOUND = "sdbatch-found"  # the PNG text chunk of chain_found


def _size(picture: Picture) -> int:
    w, h = picture.image.size
    latents = 0 if picture.latents is None else picture.latents.numel() * 4
    return w * h * 3 + latents


class Intermediates:
    def __init__(self, run_dir: Path, budget_bytes: int, folder: Path | None = None):
        self.folder = folder or run_dir / FOLDER
        self.budget = budget_bytes
        self._memory: OrderedDict[str, Picture] = OrderedDict()

    def has(self, key: str) -> bool:
        return key in self._memory or (self.folder / f"{key}.png").exists()

    def put(self, key: str, picture: Picture) -> None:
        """Keep ``picture`` under ``key``: on disk first (latents, then the picture, whose
        file says the pair is complete), then in memory."""
        buf = io.BytesIO()
        info = PngImagePlugin.PngInfo()
        if picture.chain_found:
            info.add_text(FOUND, json.dumps(picture.chain_found))
        picture.image.save(buf, format="PNG", pnginfo=info)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            atomic.remove_stale_temps(self.folder)
            if picture.latents is not None:
                atomic.write_bytes(self.folder / f"{key}.safetensors",
                                   save({"latents": picture.latents.contiguous()}))
            atomic.write_bytes(self.folder / f"{key}.png", buf.getvalue())
        except OSError as e:
            raise WriteError(f"cannot write {self.folder / key}.*: {e}") from e
        self._remember(key, picture)

    def get(self, key: str) -> Picture:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        with Image.open(self.folder / f"{key}.png") as im:
            image = im.convert("RGB")
            found = json.loads(im.info.get(FOUND, "{}"))
        tensors = self.folder / f"{key}.safetensors"
        latents = load(tensors.read_bytes())["latents"] if tensors.exists() else None
        picture = Picture(image, latents, chain_found=found)
        self._remember(key, picture)
        return picture

    def release(self, key: str) -> None:
        """The last call that needed ``key`` is done: free its memory (the file stays until
        the run completes)."""
        self._memory.pop(key, None)

    def remove_all(self) -> None:
        self._memory.clear()
        shutil.rmtree(self.folder, ignore_errors=True)

    def _remember(self, key: str, picture: Picture) -> None:
        self._memory[key] = picture
        self._memory.move_to_end(key)
        while len(self._memory) > 1 and sum(map(_size, self._memory.values())) > self.budget:
            self._memory.popitem(last=False)


CONTROL_FOLDER = "controlnet"
MAPS_KEPT = 16  # control maps kept in memory, the most recently used (the rest: on disk)


class ControlMaps:
    """Preprocessed ControlNet images, made once per content key (the image's hash and the
    preprocessor's settings: plan.control_units) and shared by every image that uses them;
    ``controlnet/<key>.png`` in the run folder (kept: the manifest names them), written
    atomically, read back after a resume instead of preprocessing again."""

    def __init__(self, run_dir: Path | None):
        self.folder = None if run_dir is None else run_dir / CONTROL_FOLDER
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()

    def get(self, unit: dict) -> np.ndarray:
        key = unit["map"]
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = None if self.folder is None else self.folder / f"{key}.png"
        if path is not None and path.exists():
            with Image.open(path) as im:
                detected = np.asarray(im.convert("RGB"))
        else:
            from sdbatch import preprocessors
            from sdbatch.images import read_image

            detected = preprocessors.run(unit["preprocessor"],
                                         np.asarray(read_image(Path(unit["image"]))),
                                         unit["processor_res"], unit["low_threshold"],
                                         unit["high_threshold"])
            if path is not None:
                buf = io.BytesIO()
                Image.fromarray(detected).save(buf, format="PNG")
                try:
                    self.folder.mkdir(parents=True, exist_ok=True)
                    atomic.write_bytes(path, buf.getvalue())
                except OSError as e:
                    raise WriteError(f"cannot write {path}: {e}") from e
        self._memory[key] = detected
        if len(self._memory) > MAPS_KEPT and self.folder is not None:  # a sweep over many
            self._memory.popitem(last=False)  # control images: memory stays flat
        return detected
