"""Image upscalers by their WebUI names, and the WebUI's upscale call around them
(modules/upscaler.py Upscaler.upscale): the target is the scaled size rounded down to a
multiple of 8, reached by the upscaler and then a Lanczos resize to the exact size.

Lanczos and Nearest are built in; an upscaler model (sdbatch.models.upscaler_models) comes
in as ``model``, one pass of it (a picture -> the picture times the model's scale), which
runs until the target is covered, at most three times, as the WebUI repeats it.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

BUILT_IN = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
ModelPass = Callable[[Image.Image], Image.Image]


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The upscale's target: each side times scale, rounded down to a multiple of 8."""
    return int(width * scale // 8 * 8), int(height * scale // 8 * 8)


def upscale(image: Image.Image, scale: float, upscaler: str,
            model: ModelPass | None = None) -> Image.Image:
    """The WebUI's Upscaler.upscale: up to 3 passes of the upscaler (a model's own scale, a
    built-in's ``scale``) while the picture is smaller than the target, none when it is
    already as large (a scale below 1), then a Lanczos resize to the target."""
    target = scaled_size(image.width, image.height, scale)
    if model is None and upscaler not in BUILT_IN:
        raise ValueError(f"unknown upscaler {upscaler!r}; built in: {', '.join(BUILT_IN)}")
    step = model or (lambda im: im.resize((int(im.width * scale), int(im.height * scale)),
                                          BUILT_IN[upscaler]))
    out = image
    for i in range(3):
        if out.width >= target[0] and out.height >= target[1] and (i > 0 or scale != 1):
            break
        before = out.size
        out = step(out)
        if out.size == before:
            break
    if out.size != target:
        out = out.resize(target, Image.Resampling.LANCZOS)
    return out


def resize(image: Image.Image, width: int, height: int, upscaler: str,
           model: ModelPass | None = None) -> Image.Image:
    """A picture at exactly width x height (hires fix's image upscale, the WebUI's
    images.resize_image): a built-in upscaler resizes straight there, a model upscales by
    what covers the box and Lanczos gives the exact size."""
    if model is None:
        return image.resize((width, height), BUILT_IN[upscaler])
    scale = max(width / image.width, height / image.height)
    if scale > 1:
        image = upscale(image, scale, upscaler, model)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return image


def upscale_to(image: Image.Image, width: int, height: int, upscaler: str,
               model: ModelPass | None = None) -> Image.Image:
    """The Extras tab's "scale to" with "crop to fit": scaled to cover width x height, then
    centred on a canvas of that size (what hangs over is cut off)."""
    big = upscale(image, max(width / image.width, height / image.height), upscaler, model)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(big, (width // 2 - big.width // 2, height // 2 - big.height // 2))
    return canvas
