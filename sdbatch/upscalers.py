"""Image upscalers by their WebUI names, and the WebUI's upscale call around them
(modules/upscaler.py Upscaler.upscale): the target is the scaled size rounded down to a
multiple of 8, reached by the upscaler and then a Lanczos resize to the exact size.

Lanczos and Nearest are built in; upscaler model files come later (issue 11, spandrel).
"""

from __future__ import annotations

from PIL import Image

BUILT_IN = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


def scaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The upscale's target: each side times scale, rounded down to a multiple of 8."""
    return int(width * scale // 8 * 8), int(height * scale // 8 * 8)


def upscale(image: Image.Image, scale: float, upscaler: str) -> Image.Image:
    if upscaler not in BUILT_IN:
        raise ValueError(f"unknown upscaler {upscaler!r}; built in: {', '.join(BUILT_IN)}")
    target = scaled_size(image.width, image.height, scale)
    out = image.resize((int(image.width * scale), int(image.height * scale)),
                       BUILT_IN[upscaler])
    if out.size != target:
        out = out.resize(target, Image.Resampling.LANCZOS)
    return out


def upscale_to(image: Image.Image, width: int, height: int, upscaler: str) -> Image.Image:
    """The Extras tab's "scale to" with "crop to fit": scaled to cover width x height, then
    centred on a canvas of that size (what hangs over is cut off)."""
    big = upscale(image, max(width / image.width, height / image.height), upscaler)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(big, (width // 2 - big.width // 2, height // 2 - big.height // 2))
    return canvas
