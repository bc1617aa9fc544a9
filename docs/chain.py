"""A run's chains as one picture for the README: a row per image, a column per stage
(txt2img, hires fix, inpaint ...), each stage's picture as that stage made it.

    python -m sdbatch +job=lego_building run.dir=outputs/lego run.keep_intermediates=true
    python docs/chain.py outputs/lego docs/lego_building.png

Pictures are enlarged by whole pixels (nearest neighbour) to one height, so what the README
shows is what the model drew.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

HEIGHT = 256
LABEL = 14


def main(run_dir: Path, out: Path) -> None:
    entries = [json.loads(line) for line in (run_dir / "manifest.jsonl").read_text().splitlines()
               if line.strip()]
    rows = []
    for entry in entries:
        stages = entry["recipe"]["stages"]
        pictures = [Image.open(run_dir / "intermediates" / f"{s['key']}.png")
                    for s in stages[:-1]] + [Image.open(run_dir / entry["file"])]
        labels = [s["kind"] for s in stages]
        rows.append((entry, [p.convert("RGB") for p in pictures], labels))
    columns = max(len(p) for _, p, _ in rows)
    sheet = Image.new("RGB", (HEIGHT * columns, (HEIGHT + LABEL) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (entry, pictures, labels) in enumerate(rows):
        y = r * (HEIGHT + LABEL)
        p = entry["recipe"]["params"]
        for c, (picture, label) in enumerate(zip(pictures, labels, strict=True)):
            scale = HEIGHT // picture.height
            sheet.paste(picture.resize((picture.width * scale, HEIGHT), Image.NEAREST),
                        (c * HEIGHT, y + LABEL))
            text = f"{label} {picture.width}x{picture.height}"
            if c == 0:
                text += f", seed {p['seed']}, CFG {p['cfg_scale']:g}"
            draw.text((c * HEIGHT + 4, y + 1), text, fill="black")
    sheet.save(out, optimize=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
