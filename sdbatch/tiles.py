"""The SD upscale script's tiles, the WebUI's way (modules/images.py split_grid and
combine_grid): where tiles lie on a picture, cutting them out, and pasting them back with
linear ramps across the overlaps; and the seed each tile is sampled with.

Pure geometry and pixel work, tested on their own; sdbatch.stages.sd_upscale samples the
tiles between split and blend, and an upscaler model runs on them (the WebUI's
upscale_with_model cuts the same grid and blends its outputs on the grid scaled).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


def positions(size: int, tile: int, overlap: int) -> tuple[int, ...]:
    """Tile offsets along one side: as many tiles as cover ``size`` with ``overlap`` between
    neighbours, spread evenly from 0 to size - tile (offsets truncated to whole pixels)."""
    if tile > size:
        raise ValueError(f"a {tile} px tile does not fit in {size} px")
    if not 0 <= overlap < tile:
        raise ValueError(f"the overlap ({overlap}) must be less than the tile ({tile})")
    count = max(1, math.ceil((size - overlap) / (tile - overlap)))
    step = (size - tile) / (count - 1) if count > 1 else 0
    return tuple(min(int(i * step), size - tile) for i in range(count))


@dataclass(frozen=True)
class Grid:
    """The tiles of a width x height picture: columns at ``xs``, rows at ``ys``, row-major."""

    width: int
    height: int
    tile_w: int
    tile_h: int
    overlap: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        return [(x, y, x + self.tile_w, y + self.tile_h) for y in self.ys for x in self.xs]


def layout(width: int, height: int, tile_w: int, tile_h: int, overlap: int) -> Grid:
    return Grid(width, height, tile_w, tile_h, overlap, positions(width, tile_w, overlap),
                positions(height, tile_h, overlap))


def scaled(grid: Grid, factor: int) -> Grid:
    """The same tiles on a picture ``factor`` times larger: where an upscaler model's tile
    outputs lie (the WebUI's upscale_with_model scales the grid by its model's scale)."""
    return Grid(grid.width * factor, grid.height * factor, grid.tile_w * factor,
                grid.tile_h * factor, grid.overlap * factor,
                tuple(x * factor for x in grid.xs), tuple(y * factor for y in grid.ys))


def split(image: Image.Image, grid: Grid) -> list[Image.Image]:
    """The tiles, row by row."""
    return [image.crop(box) for box in grid.boxes]


def ramp(overlap: int) -> np.ndarray:
    """The paste mask across an overlap: 0 at the earlier tile's side, rising by 255 /
    overlap per pixel (truncated to 8 bits), so the later tile takes over linearly."""
    return (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)


def blend(tiles: list[Image.Image], grid: Grid) -> Image.Image:
    """Tiles (row-major, as split gives them) back into one picture: in each row a later
    tile's first ``overlap`` columns go over the earlier one through the ramp and the rest
    is pasted as it is; the rows then stack the same way downwards. Where tiles overlap
    more than ``overlap`` (evenly spread positions), the later tile wins."""
    ov = grid.overlap
    across = Image.fromarray(np.tile(ramp(ov), (grid.tile_h, 1)), "L") if ov else None
    down = Image.fromarray(np.tile(ramp(ov)[:, None], (1, grid.width)), "L") if ov else None
    out = Image.new("RGB", (grid.width, grid.height))
    n = len(grid.xs)
    for r, y in enumerate(grid.ys):
        row = Image.new("RGB", (grid.width, grid.tile_h))
        for c, x in enumerate(grid.xs):
            tile = tiles[r * n + c]
            if c == 0 or not ov:
                row.paste(tile, (x, 0))
                continue
            row.paste(tile.crop((0, 0, ov, grid.tile_h)), (x, 0), across)
            row.paste(tile.crop((ov, 0, grid.tile_w, grid.tile_h)), (x + ov, 0))
        if r == 0 or not ov:
            out.paste(row, (0, y))
            continue
        out.paste(row.crop((0, 0, grid.width, ov)), (0, y), down)
        out.paste(row.crop((0, ov, grid.width, grid.tile_h)), (0, y + ov))
    return out


def tile_seeds(seed: int, subseed: int, count: int, batch_size: int,
               variation: bool) -> list[tuple[int, int]]:
    """Each tile's (seed, variation seed) as the WebUI's script gives them. It renders the
    tiles ``batch_size`` at a time and starts each batch one above the previous batch's
    first seed; inside a batch the seeds count up (so neighbouring batches share seeds), or,
    with a variation strength above 0, the seed stays and the variation seeds count up
    from ``subseed``, as in any WebUI batch."""
    if variation:
        return [(seed + t // batch_size, subseed + t % batch_size) for t in range(count)]
    return [(seed + t // batch_size + t % batch_size, subseed) for t in range(count)]
