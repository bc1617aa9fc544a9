"""PNG bytes with the A1111 infotext (`parameters`) and the full sdbatch recipe (`sdbatch`)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

RECIPE_CHUNK = "sdbatch"


def encode(image: Image.Image, infotext: str, recipe: dict[str, Any]) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    info.add_text(RECIPE_CHUNK, json.dumps(recipe, sort_keys=True, ensure_ascii=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_text(path: Path) -> dict[str, str]:
    """A PNG's text chunks; ValueError for a picture of another format (no such chunks)."""
    with Image.open(path) as im:
        if not hasattr(im, "text"):
            raise ValueError(f"{path} is a {im.format} picture, not a PNG: sdbatch writes its "
                             "parameters and recipe into PNG text chunks")
        return dict(im.text)


def read_recipe(path: Path) -> dict[str, Any]:
    text = read_text(path)
    if RECIPE_CHUNK not in text:
        raise ValueError(f"{path} has no '{RECIPE_CHUNK}' chunk: it was not made by sdbatch")
    return json.loads(text[RECIPE_CHUNK])
