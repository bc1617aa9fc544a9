"""Tile a run's images into one picture for the README: rows = prompts, columns = CFG.

    python -m sdbatch +job=lego_building run.dir=outputs/lego_building
    python docs/grid.py outputs/lego_building docs/lego_building.png

Images are enlarged by whole pixels (nearest neighbour), so what the README shows is what the
model drew, not a smoothed version of it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SCALE = 4
LABEL = 14


def main(run_dir: Path, out: Path) -> None:
    entries = [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines()
               if line.strip()]
    params = [e["recipe"]["params"] for e in entries]
    prompts = list(dict.fromkeys(p["prompt"] for p in params))
    cfgs = sorted({p["cfg_scale"] for p in params})
    first = Image.open(run_dir / entries[0]["file"])
    w, h = first.width * SCALE, first.height * SCALE
    sheet = Image.new("RGB", (w * len(cfgs), (h + LABEL) * len(prompts)), "white")
    draw = ImageDraw.Draw(sheet)
    for entry, p in zip(entries, params, strict=True):
        row, col = prompts.index(p["prompt"]), cfgs.index(p["cfg_scale"])
        image = Image.open(run_dir / entry["file"]).convert("RGB")
        x, y = col * w, row * (h + LABEL)
        sheet.paste(image.resize((w, h), Image.NEAREST), (x, y + LABEL))
        draw.text((x + 4, y + 1), f"seed {p['seed']}, CFG {p['cfg_scale']:g}", fill="black")
    sheet.save(out, optimize=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
