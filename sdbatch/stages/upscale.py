"""The WebUI's Extras tab upscale: no diffusion. The picture is upscaled by ``scale`` (or to
resize_x x resize_y, cropped to fit) with a built-in upscaler or a model, and a second
upscaler's result is blended in by ``upscaler_2_visibility``."""

from __future__ import annotations

from PIL import Image

from sdbatch import upscalers
from sdbatch.models.upscaler_models import UpscalerModels
from sdbatch.stages.common import Item, StepCallback
from sdbatch.stages.picture import Picture


def upscale_one(image: Image.Image, p: dict, models: UpscalerModels | None = None
                ) -> Image.Image:
    def by(name: str) -> Image.Image:
        model = models.pass_of(name) if models else None
        if p["resize_x"] and p["resize_y"]:
            return upscalers.upscale_to(image, p["resize_x"], p["resize_y"], name, model)
        return upscalers.upscale(image, p["scale"], name, model)

    out = by(p["upscaler"])
    if p["upscaler_2"] != "None" and p["upscaler_2_visibility"] > 0:
        out = Image.blend(out, by(p["upscaler_2"]), p["upscaler_2_visibility"])
    return out


def run(stack: None, items: list[Item], on_step: StepCallback | None = None,
        models: UpscalerModels | None = None) -> list[Picture]:
    """``stack`` is unused: an upscale loads no diffusion model."""
    return [Picture(upscale_one(item.source.image, item.params, models)) for item in items]
