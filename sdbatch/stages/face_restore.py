"""Face restoration, the WebUI's "Restore faces" (and its Extras' GFPGAN and CodeFormer):
each face found is aligned onto the FFHQ template at 512x512, restored by the model,
pasted back through a feathered mask, and the result blended over the picture by
``visibility``. A picture with no face passes unchanged; its record says ``faces: 0``.

The model is called as the WebUI calls it (face_restoration_utils): the crop in -1..1, RGB;
GFPGAN with return_rgb=False, CodeFormer with its fidelity ``weight`` and adain=True; the
output clamped to -1..1 and truncated to 8 bits. GFPGAN's StyleGAN decoder would draw fresh
noise on every call in the WebUI (no two runs alike); here it takes the noise stored in
the model file, so a run reproduces.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sdbatch import faces
from sdbatch.models.image_models import ImageModels
from sdbatch.stages.common import Item, StepCallback
from sdbatch.stages.picture import Picture


def _restore_crop(model: torch.nn.Module, architecture: str, crop: np.ndarray, weight: float,
                  device: torch.device) -> np.ndarray:
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float().div(255).sub(0.5).div(0.5)
    with torch.no_grad():
        if architecture == "GFPGAN":
            y = model(x.to(device), return_rgb=False, randomize_noise=False)[0]
        else:
            y = model(x.to(device), weight=weight, adain=True)[0]
    y = (y.squeeze(0).float().cpu().clamp(-1, 1) + 1) / 2
    return (y.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def restore(image: Image.Image, model: torch.nn.Module, architecture: str, visibility: float,
            weight: float, device: torch.device) -> tuple[Image.Image, int | None]:
    """The picture with its faces restored and blended in by visibility, and how many
    faces were found. Visibility 0 returns the picture as it is, looking for none (None),
    as the WebUI does."""
    if visibility == 0:
        return image, None
    source = np.asarray(image.convert("RGB"))
    found = faces.detect(source)
    if not found:
        return image, 0
    out = source.astype(np.float32)
    for face in found:  # each crop from the source, pasted onto the running result
        matrix = faces.align_matrix(face)
        restored = _restore_crop(model, architecture, faces.crop(source, matrix), weight,
                                 device)
        out = faces.paste(out, restored, matrix)
    result = faces.blend(source, out.astype(np.uint8), visibility)
    return Image.fromarray(result), len(found)


def run(stack: None, items: list[Item], on_step: StepCallback | None = None,
        restorers: ImageModels | None = None) -> list[Picture]:
    """``stack`` is unused: a face restoration loads no stack, only its restorer."""
    out = []
    for item in items:
        p = item.params
        image, count = restore(item.source.image, restorers.get(p["model_sha256"]),
                               p["architecture"], p["visibility"], p["weight"],
                               restorers.device)
        out.append(Picture(image, found={} if count is None else {"faces": count}))
    return out
