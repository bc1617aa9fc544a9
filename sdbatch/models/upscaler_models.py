"""Upscaler model files: found by the WebUI's names, loaded once per run, run in tiles.

A name is a file stem under one of the WebUI's upscaler folders of paths.models (ESRGAN/,
RealESRGAN/, SwinIR/, DAT/, HAT/; ComfyUI's upscale_models/ too), one of the names the
WebUI shows for the files it downloads ("R-ESRGAN 4x+" is RealESRGAN_x4plus.pth), or a
path. Any architecture spandrel reads works (sdbatch.models.spandrel_files).

A model runs as the WebUI's upscale_with_model (modules/upscaler_utils.py): the picture is
cut into tiles of ``tile`` px overlapping by ``overlap`` (its settings ESRGAN_tile 192 and
ESRGAN_tile_overlap 8), each tile is upscaled alone, and the tiles are pasted back with
the SD upscale script's linear ramps (sdbatch.tiles), so memory on the device is that of
one tile whatever the picture's size. Two deliberate differences: a tile never exceeds the
picture (the WebUI pads a small picture's tile with black, which then bleeds into its
edges), and the model sees RGB, the channel order its weights were trained in (the WebUI
feeds BGR).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdbatch import tiles
from sdbatch.models import hashing, names, spandrel_files
from sdbatch.models.single_file import ModelFileError

# the names the WebUI shows for the upscaler files it downloads -> their file stems
# (modules/realesrgan_model.py, esrgan_model.py, swinir_model.py, dat_model.py)
WEBUI_NAMES = {
    "R-ESRGAN 4x+": ("RealESRGAN_x4plus",),
    "R-ESRGAN 4x+ Anime6B": ("RealESRGAN_x4plus_anime_6B",),
    "R-ESRGAN 2x+": ("RealESRGAN_x2plus",),
    "R-ESRGAN General 4xV3": ("realesr-general-x4v3",),
    "R-ESRGAN General WDN 4xV3": ("realesr-general-wdn-x4v3",),
    "R-ESRGAN AnimeVideo": ("realesr-animevideov3",),
    "ESRGAN_4x": ("ESRGAN_4x", "ESRGAN"),
    "SwinIR 4x": ("SwinIR_4x", "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN"),
    "DAT x2": ("DAT_x2",),
    "DAT x3": ("DAT_x3",),
    "DAT x4": ("DAT_x4",),
}
# the WebUI lists Real-ESRGAN's files by these names only, never by their stems
_REALESRGAN = {stems[0]: name for name, stems in WEBUI_NAMES.items()
               if name.startswith("R-ESRGAN")}


@dataclass(frozen=True)
class UpscalerFile:
    """An upscaler model the job names, found up front."""

    name: str  # as the WebUI writes it in the infotext
    path: Path
    sha256: str

    @classmethod
    def of(cls, path: Path, given: str) -> UpscalerFile:
        name = given if given in WEBUI_NAMES else _REALESRGAN.get(names.stem(path.name),
                                                                  names.stem(path.name))
        return cls(name, path, hashing.sha256(path))


def resolve(name: str, models: Path | None) -> Path:
    """The file an upscaler name means (a name without extension: a .safetensors beside a
    pickle of the same stem preferred); NameNotFound says where it looked."""
    tried: list[str] = []
    for stem in (*WEBUI_NAMES.get(name, ()), name):
        try:
            path = names.resolve("upscaler", stem, models)
        except names.AmbiguousName:
            raise
        except names.NameNotFound as e:
            tried.append(str(e))
            continue
        safer = path.with_suffix(".safetensors")
        return safer if names.stem(stem) == stem and safer.is_file() else path
    raise names.NameNotFound(tried[-1])


def check(model, path: Path) -> None:
    """An upscaler must turn a picture into a picture (not restore faces or inpaint)."""
    if getattr(model, "purpose", None) not in ("SR", "Restoration"):
        raise ModelFileError(
            f"{path} is a {model.architecture.name} model for {model.purpose}, not an "
            "upscaler: give a super-resolution model (ESRGAN, Real-ESRGAN, SwinIR, ...)")


def _to_tensor(image: Image.Image, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device, dtype)


def _to_image(tensor: torch.Tensor) -> Image.Image:
    array = tensor[0].float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.round(array * 255).astype(np.uint8), "RGB")


def tile_grid(width: int, height: int, tile: int, overlap: int) -> tiles.Grid | None:
    """The tiles a model pass cuts a picture into (the WebUI's split_grid), each side's tile
    at most the picture's; None when the picture fits one tile (or tile is 0: untiled)."""
    if tile <= 0 or (width <= tile and height <= tile):
        return None
    tw, th = min(tile, width), min(tile, height)
    return tiles.layout(width, height, tw, th, min(overlap, tw - 1, th - 1))


def upscale_tiled(model: Callable[[torch.Tensor], torch.Tensor], image: Image.Image,
                  scale: int, tile: int, overlap: int, device: torch.device,
                  dtype: torch.dtype) -> Image.Image:
    """One pass of a model over a picture, a tile at a time; the tiles' outputs are blended
    with ramps across the overlaps scaled by the model's scale."""
    grid = tile_grid(image.width, image.height, tile, overlap)
    if grid is None:
        return _to_image(model(_to_tensor(image, device, dtype)))
    done = [_to_image(model(_to_tensor(piece, device, dtype)))
            for piece in tiles.split(image, grid)]
    return tiles.blend(done, tiles.scaled(grid, scale))


class UpscalerModels:
    """A run's upscaler models by the names the job gives them: each loaded on first use and
    kept until release(), on the executor's device, in its dtype where the architecture
    supports it (float32 otherwise)."""

    def __init__(self, files: dict[str, UpscalerFile], device: torch.device,
                 dtype: torch.dtype, allow_pickle: bool = False, tile: int = 192,
                 overlap: int = 8):
        self.files, self.tile, self.overlap = files, tile, overlap
        self.loaded = spandrel_files.Loaded(device, dtype, allow_pickle)

    def pass_of(self, name: str) -> Callable[[Image.Image], Image.Image] | None:
        """One pass of the named model (picture -> picture times the model's scale); None
        for a built-in upscaler."""
        if name not in self.files:
            return None
        model = self.loaded.get(self.files[name].path)
        tile = 0 if model.tiling.name == "INTERNAL" else self.tile  # it tiles by itself
        return lambda image: upscale_tiled(model, image, model.scale, tile, self.overlap,
                                           model.device, model.dtype)

    def release(self) -> None:
        self.loaded.release()
