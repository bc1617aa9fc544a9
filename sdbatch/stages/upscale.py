"""The WebUI's Extras tab: no diffusion. The picture is upscaled by ``scale`` (or to
resize_x x resize_y, cropped to fit) with a built-in upscaler or a model, a second
upscaler's result blended in by ``upscaler_2_visibility``; then, in the WebUI's order,
GFPGAN and CodeFormer restore its faces where their visibility is above 0."""

from __future__ import annotations

from PIL import Image

from sdbatch import upscalers
from sdbatch.models.image_models import ImageModels
from sdbatch.models.upscaler_models import UpscalerModels
from sdbatch.stages import face_restore
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


def extras_one(image: Image.Image, p: dict, models: UpscalerModels | None,
               restorers: ImageModels | None) -> Picture:
    """The upscale, then GFPGAN, then CodeFormer (each counting the faces it found)."""
    out, found = upscale_one(image, p, models), {}
    for name, weight in (("GFPGAN", 0.0), ("CodeFormer", p["codeformer_weight"])):
        visibility = p[f"{name.lower()}_visibility"]
        if visibility > 0:
            model = restorers.get(p[f"{name.lower()}_sha256"])
            out, found[f"{name.lower()}_faces"] = face_restore.restore(
                out, model, name, visibility, weight, restorers.device)
    return Picture(out, found=found)


def run(stack: None, items: list[Item], on_step: StepCallback | None = None,
        models: UpscalerModels | None = None, restorers: ImageModels | None = None
        ) -> list[Picture]:
    """``stack`` is unused: an upscale loads no stack; an upscaler model or a face
    restorer only where the step names one."""
    return [extras_one(item.source.image, item.params, models, restorers) for item in items]
