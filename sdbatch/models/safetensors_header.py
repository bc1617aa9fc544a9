"""A .safetensors file's JSON header, read without its tensors and without torch: where
each tensor lies, and the file's metadata (a LoRA's training name, its stored hash)."""

from __future__ import annotations

import json
import os
from typing import Any

MAX_HEADER = 100 << 20  # a header past this is no header (a file of another format)


def read(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(header, where the tensors' bytes start): tensor name -> {dtype, shape, data_offsets}
    relative to that start, and "__metadata__". OSError or ValueError for a file with no
    readable header."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a header")
        size = int.from_bytes(raw, "little")
        if size > MAX_HEADER:
            raise ValueError(f"header of {size} bytes")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header, 8 + size
