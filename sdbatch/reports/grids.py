"""X/Y/Z plot sheets of a run folder, as the WebUI's script draws them, in grids/.

Each image's place in the matrix is recovered from the job that made the folder (run.json's
expanded job and seed nonce): the image index is a mixed-radix number over the matrix's axes
(outermost first) and, innermost, the images of a cell. So a sheet knows every cell, rendered
or not, and a run still in progress, interrupted or with failures gives a sheet whose missing
images are grey cells labelled as such. Thumbnails shrink (never grow) so that a sheet stays
within grid.max_megapixels; labels read "Label: value", long prompts shortened to what
differs, with a legend under each sheet.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from sdbatch import atomic, matrix, schema
from sdbatch.output import manifest, png
from sdbatch.output.infotext import number, quote
from sdbatch.output.run_folder import record_grids
from sdbatch.schema import GRID_BATCH, Job, JobError

GRID_CHUNK = "sdbatch_grid"  # the PNG text chunk saying which image is in which cell
MIN_CELL = 16  # px: a thumbnail is never smaller, whatever the budget
SHORTEN_FROM = 24  # characters: shorter values are shown whole
MISSING = {"failed": "failed", "missing": "not rendered"}
BACKGROUND, INK, GREY = (255, 255, 255), (0, 0, 0), (150, 150, 150)

# the WebUI's words for the keys of the table (its infotext and X/Y/Z plot's axis names)
LABELS = {"model.checkpoint": "Checkpoint", "prompt": "Prompt",
          "negative_prompt": "Negative prompt", "init_image": "Init image",
          "params.sampler": "Sampler", "params.schedule_type": "Schedule type",
          "params.steps": "Steps", "params.cfg_scale": "CFG scale", "params.seed": "Seed",
          "params.width": "Width", "params.height": "Height", "params.clip_skip": "Clip skip",
          "params.subseed": "Variation seed", "params.subseed_strength": "Variation strength",
          "params.seed_resize_from_w": "Seed resize from width",
          "params.seed_resize_from_h": "Seed resize from height", "params.eta": "Eta",
          "params.ensd": "ENSD", "params.tiling": "Tiling", GRID_BATCH: "Image"}
PATH_KEYS = ("model.checkpoint", "init_image", "mask", "image", "model")  # shown by file name


def label(key: str) -> str:
    """'params.cfg_scale' -> 'CFG scale'; 'post.0.hires_fix.denoise' -> 'Hires fix denoise',
    a later step with its place: 'post.2.inpaint.denoise' -> 'Inpaint denoise (step 3)',
    a unit as its infotext: 'controlnet.0.weight' -> 'ControlNet 0 weight'."""
    if key in LABELS:
        return LABELS[key]
    parts = key.split(".")
    step = int(parts[1]) if parts[0] == "post" and parts[1].isdigit() else 0
    text = " ".join(p.replace("_", " ") for p in parts[2 if parts[0] == "post" else 0:])
    text = re.sub(r"controlnet (\d+)", r"ControlNet \1", text)  # its infotext's words
    return text[:1].upper() + text[1:] + (f" (step {step + 1})" if step else "")


def value_text(key: str, value: Any) -> str:
    """A value as a label shows it: 7.0 -> '7', a file by its name."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return number(value)
    if isinstance(value, str) and key.rsplit(".", 1)[-1] in PATH_KEYS and "/" in value:
        return Path(value).name
    return str(value)


def shorten(texts: list[str]) -> tuple[list[str], str, str]:
    """Long texts that share words at the start or end, shown as what differs:
    (shortened texts, shared start, shared end). A shared run counts from two words, each
    text keeps at least one word of its own, short texts are kept whole."""
    if len(set(texts)) < 2 or max(map(len, texts)) < SHORTEN_FROM:
        return list(texts), "", ""
    words = [t.split(" ") for t in texts]
    shortest = min(map(len, words))
    p = 0
    while p < shortest - 1 and len({w[p] for w in words}) == 1:
        p += 1
    q = 0
    while q < shortest - p - 1 and len({w[-1 - q] for w in words}) == 1:
        q += 1
    p, q = (p if p >= 2 else 0), (q if q >= 2 else 0)
    out = [" ".join(w[p:len(w) - q]) for w in words]
    out = [("… " if p else "") + t + (" …" if q else "") for t in out]
    return out, " ".join(words[0][:p]), " ".join(words[0][len(words[0]) - q:])


@dataclass(frozen=True)
class GridAxis:
    """An axis of the matrix: its keys (a zip group's members; ('batch',) for the images of a
    cell) and a row of values per position."""

    keys: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]

    @property
    def title(self) -> str:
        return ", ".join(label(k) for k in self.keys)

    @property
    def slug(self) -> str:
        key = self.keys[0].removeprefix("params.").removeprefix("model.")
        return key.replace(".", "-")

    def labels(self) -> tuple[list[str], list[str]]:
        """("Label: value" per position, a line per key; legend lines for what shortening
        left out)."""
        columns, notes = [], []
        for n, key in enumerate(self.keys):
            texts = [value_text(key, row[n]) for row in self.values]
            short, start, end = shorten(texts)
            columns.append([f"{label(key)}: {t}" for t in short])
            if start:
                notes.append(f"{label(key)}: '… ' stands for the shared start \"{start}\"")
            if end:
                notes.append(f"{label(key)}: ' …' stands for the shared end \"{end}\"")
        return ["\n".join(lines) for lines in zip(*columns, strict=True)], notes

    def values_text(self) -> str:
        """The values as the WebUI's infotext writes "X Values": CSV, as its X/Y/Z plot reads
        them back (a value with a comma or a quote in quotes, its quotes doubled)."""
        return ", ".join(_csv(" / ".join(value_text(k, v)
                                         for k, v in zip(self.keys, row, strict=True)))
                         for row in self.values)


def _csv(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if ("," in text or '"' in text) else text


def run_axes(job: Job) -> list[GridAxis]:
    """Every axis of the job's matrix, outermost first, and innermost the images of a cell:
    an image's index is its mixed-radix number over these."""
    out = [GridAxis(keys, tuple(rows)) for keys, rows in matrix.axes(job)]
    per_cell = job.params.batch_count * job.params.batch_size
    return out + [GridAxis((GRID_BATCH,), tuple((i + 1,) for i in range(per_cell)))]


def index_of(coords: list[int], lengths: list[int]) -> int:
    """The image index at these coordinates (itertools.product order: the last fastest)."""
    index = 0
    for c, n in zip(coords, lengths, strict=True):
        index = index * n + c
    return index


def pick_axes(lengths: list[int], x: int | None = None, y: int | None = None,
              z: int | None = None) -> tuple[int | None, int | None, list[int]]:
    """(x, y, sheet axes) among axes of these lengths, by position: the ones given, else the
    longest of those with more than one value (of two equally long, the outer one); of the
    two longest the inner gives the columns. The sheets: z, then the others outermost first."""
    free = sorted((i for i, n in enumerate(lengths) if n > 1 and i not in (x, y, z)),
                  key=lambda i: -lengths[i])
    if x is None and y is None and len(free) >= 2:
        y, x = sorted(free[:2])
    elif x is None and free:
        x = free[0]
    elif y is None and free and x is not None:
        y = free[0]
    taken = {x, y, z}
    rest = [i for i, n in enumerate(lengths) if n > 1 and i not in taken]
    return x, y, ([z] if z is not None else []) + rest


def sheet_scale(cols: int, rows: int, w: int, h: int, extra_w: int, extra_h: int,
                budget: float) -> float:
    """The largest s <= 1 with (extra_w + cols*w*s) * (extra_h + rows*h*s) <= budget: the
    thumbnails' scale that keeps a sheet with label bands of this size within its pixels."""
    a = cols * rows * w * h
    b = extra_w * rows * h + extra_h * cols * w
    c = extra_w * extra_h - budget
    if c >= 0:
        return 0.0
    return min(1.0, (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a))


@dataclass
class Cell:
    index: int
    file: str | None  # relative to the run folder
    status: str  # ok, failed, missing


@dataclass
class Sheet:
    x: GridAxis | None
    y: GridAxis | None
    fixed: list[tuple[GridAxis, int]]  # the sheet's own position on each other axis
    cells: list[list[Cell]]  # rows of columns

    def title(self) -> list[str]:
        return [", ".join(f"{label(k)}: {value_text(k, v)}"
                          for k, v in zip(a.keys, a.values[i], strict=True))
                for a, i in self.fixed]

    def name(self, number_: int | None) -> str:
        axes = [a.slug for a in (self.x, self.y) if a is not None]
        stem = "-by-".join(axes) or "grid"
        return f"{stem}-{number_:02d}.png" if number_ is not None else f"{stem}.png"


def sheets(axes: list[GridAxis], entries: dict[int, dict], run_dir: Path,
           x: int | None, y: int | None, z: int | None) -> list[Sheet]:
    """The sheets of a run whose images have these manifest entries."""
    lengths = [len(a.values) for a in axes]
    x, y, others = pick_axes(lengths, x, y, z)

    def cell(coords: list[int]) -> Cell:
        index = index_of(coords, lengths)
        entry = entries.get(index, {})
        if entry.get("status") == "ok" and (run_dir / entry["file"]).is_file():
            return Cell(index, entry["file"], "ok")
        return Cell(index, None, "failed" if entry.get("status") == "failed" else "missing")

    out = []
    for at in itertools.product(*(range(lengths[i]) for i in others)):
        fixed = dict(zip(others, at, strict=True))
        rows = []
        for r in range(lengths[y] if y is not None else 1):
            row = []
            for c in range(lengths[x] if x is not None else 1):
                coords = [fixed.get(i, 0) for i in range(len(axes))]
                if x is not None:
                    coords[x] = c
                if y is not None:
                    coords[y] = r
                row.append(cell(coords))
            rows.append(row)
        out.append(Sheet(axes[x] if x is not None else None, axes[y] if y is not None else None,
                         [(axes[i], fixed[i]) for i in others], rows))
    return out


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own scalable font: nothing is downloaded, nothing needed from the system."""
    return ImageFont.load_default(size=size)


def wrap(text: str, face, width: int) -> list[str]:
    """Lines of ``text`` no wider than ``width`` px (a word wider than that is cut)."""
    out = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if face.getlength(candidate) <= width or not line:
                line = candidate
            else:
                out.append(line)
                line = word
            while face.getlength(line) > width and len(line) > 1:
                cut = len(line) - 1
                while cut > 1 and face.getlength(line[:cut]) > width:
                    cut -= 1
                out.append(line[:cut])
                line = line[cut:]
        out.append(line)
    return out


@dataclass
class Layout:
    """A sheet's geometry in pixels."""

    cell_w: int
    cell_h: int
    font_px: int
    left: int  # the row labels' band
    top: int  # the title's and column labels' bands
    legend: int  # under the cells
    cols: int
    rows: int

    @property
    def size(self) -> tuple[int, int]:
        return (self.left + self.cols * self.cell_w,
                self.top + self.rows * self.cell_h + self.legend)


def font_size(cell_w: int, cell_h: int) -> int:
    """The WebUI's grid font size ((w + h) / 25), within readable bounds."""
    return max(12, min(48, (cell_w + cell_h) // 25))


def _bands(sheet: Sheet, legend: list[str], cell_w: int, cell_h: int
           ) -> tuple[int, int, int, int]:
    """(font px, left, top, legend) bands for thumbnails of this size."""
    px = font_size(cell_w, cell_h)
    face, line, pad = font(px), _line(px), px // 3
    cols = len(sheet.cells[0])
    left = 0
    if sheet.y is not None:
        widest = max(face.getlength(t) for lab in sheet.y.labels()[0] for t in lab.split("\n"))
        left = int(min(widest, max(cell_w, 12 * px))) + 2 * pad
    width = left + cols * cell_w
    top = len([t for lab in sheet.title() for t in wrap(lab, face, width - 2 * pad)]) * line
    if sheet.x is not None:
        top += max(len(wrap(t, face, cell_w - 2 * pad)) for t in sheet.x.labels()[0]) * line
    top += 2 * pad if top else 0
    below = sum(len(wrap(t, face, width - 2 * pad)) for t in legend) * line + 2 * pad
    return px, left, top, below


def _line(px: int) -> int:
    return px + px // 4


def layout(sheet: Sheet, legend: list[str], w: int, h: int, budget: float) -> Layout:
    """Thumbnails of w x h scaled so the sheet with its labels stays within ``budget``
    pixels (never above their own size, never below MIN_CELL)."""
    cols, rows = len(sheet.cells[0]), len(sheet.cells)
    s = 1.0
    for _ in range(32):
        cw, ch = max(MIN_CELL, int(w * s)), max(MIN_CELL, int(h * s))
        px, left, top, below = _bands(sheet, legend, cw, ch)
        out = Layout(cw, ch, px, left, top, below, cols, rows)
        if out.size[0] * out.size[1] <= budget or (cw == MIN_CELL or ch == MIN_CELL):
            return out
        s = min(s * 0.97, sheet_scale(cols, rows, w, h, left, top + below, budget))
    return out


def legend_lines(sheet: Sheet, number_: int, total: int) -> list[str]:
    lines = [" · ".join(f"{which}: {a.title}" for which, a in (("X", sheet.x), ("Y", sheet.y))
                        if a is not None) + (f" · sheet {number_} of {total}" if total > 1
                                            else "")]
    for a in (sheet.x, sheet.y):
        if a is not None:
            lines += a.labels()[1]
    statuses = {c.status for row in sheet.cells for c in row}
    if statuses - {"ok"}:
        lines.append("Grey: " + ", ".join(f"{MISSING[s]}" for s in ("failed", "missing")
                                          if s in statuses) + " (as the run folder is now)")
    return lines


def fitted(parts: list[list[str]], fit: int) -> list[str]:
    """A label of several keys (each a list of wrapped lines) in ``fit`` lines: the longest
    key loses its last lines first (its cut marked " …"), so every key keeps one line
    (a zipped prompt's seed is not pushed out by the prompt)."""
    parts = [list(p) for p in parts]
    while sum(map(len, parts)) > fit:
        longest = max(parts, key=len)
        if len(longest) == 1:
            break
        longest[-2:] = [longest[-2] + " …"]
    return [t for p in parts for t in p][:fit]


def draw(sheet: Sheet, lay: Layout, legend: list[str], run_dir: Path) -> Image.Image:
    face, line, pad = font(lay.font_px), _line(lay.font_px), lay.font_px // 3
    image = Image.new("RGB", lay.size, BACKGROUND)
    pen = ImageDraw.Draw(image)
    y0 = pad if lay.top else 0
    for text in sheet.title():
        for t in wrap(text, face, lay.size[0] - 2 * pad):  # the sheet's whole width
            pen.text((pad, y0), t, fill=INK, font=face)
            y0 += line
    grid_top = lay.top
    if sheet.x is not None:
        for c, text in enumerate(sheet.x.labels()[0]):
            lines = wrap(text, face, lay.cell_w - 2 * pad)
            y = grid_top - pad - len(lines) * line
            for t in lines:
                x = lay.left + c * lay.cell_w + (lay.cell_w - face.getlength(t)) / 2
                pen.text((x, y), t, fill=INK, font=face)
                y += line
    if sheet.y is not None:
        for r, text in enumerate(sheet.y.labels()[0]):
            lines = fitted([wrap(part, face, lay.left - 2 * pad) for part in text.split("\n")],
                           max(1, lay.cell_h // line))
            y = grid_top + r * lay.cell_h + (lay.cell_h - len(lines) * line) / 2
            for t in lines:
                pen.text((pad, y), t, fill=INK, font=face)
                y += line
    for r, row in enumerate(sheet.cells):
        for c, cell in enumerate(row):
            x, y = lay.left + c * lay.cell_w, grid_top + r * lay.cell_h
            if cell.status == "ok":
                with Image.open(run_dir / cell.file) as im:
                    thumb = im.convert("RGB")
                thumb.thumbnail((lay.cell_w, lay.cell_h), Image.Resampling.LANCZOS)
                image.paste(thumb, (x + (lay.cell_w - thumb.width) // 2,
                                    y + (lay.cell_h - thumb.height) // 2))
                continue
            pen.rectangle((x + 1, y + 1, x + lay.cell_w - 2, y + lay.cell_h - 2), fill=GREY)
            small = font(max(8, min(lay.font_px, lay.cell_w // 6)))
            lines = wrap(MISSING[cell.status], small, lay.cell_w - 4)
            ty = y + (lay.cell_h - len(lines) * _line(small.size)) / 2
            for t in lines:
                pen.text((x + (lay.cell_w - small.getlength(t)) / 2, ty), t, fill=INK,
                         font=small)
                ty += _line(small.size)
    y = grid_top + lay.rows * lay.cell_h + pad
    for text in legend:
        for t in wrap(text, face, lay.size[0] - 2 * pad):
            pen.text((pad, y), t, fill=INK, font=face)
            y += line
    return image


def infotext(sheet: Sheet, run_dir: Path) -> str:
    """The WebUI's grid infotext: its first image's, with the X/Y/Z plot's keys added
    (Script, X Type, X Values, Y ..., Z ... naming the sheet's own axes)."""
    first = next((c for row in sheet.cells for c in row if c.status == "ok"), None)
    text = png.read_text(run_dir / first.file).get("parameters", "") if first else ""
    keys = {"Script": "X/Y/Z plot"}
    for which, a in (("X", sheet.x), ("Y", sheet.y)):
        if a is not None:
            keys |= {f"{which} Type": a.title, f"{which} Values": a.values_text()}
    if sheet.fixed:
        keys |= {"Z Type": ", ".join(a.title for a, _ in sheet.fixed),
                 "Z Values": " / ".join(GridAxis(a.keys, (a.values[i],)).values_text()
                                        for a, i in sheet.fixed)}
    line = ", ".join(f"{k}: {quote(v)}" for k, v in keys.items())
    return f"{text}, {line}" if text else line


def encode(image: Image.Image, sheet: Sheet, text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    cells = [[dataclasses.asdict(c) for c in row] for row in sheet.cells]
    info.add_text(GRID_CHUNK, json.dumps({
        "x": list(sheet.x.keys) if sheet.x else None,
        "y": list(sheet.y.keys) if sheet.y else None,
        "sheet": sheet.title(), "cells": cells}, ensure_ascii=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def load_job(run_dir: Path) -> tuple[Job, schema.Grid]:
    """The job that made a run folder, seeds resolved as the run drew them (run.json's
    expanded job; config.yaml for folders made before run.json held it), and its grid."""
    info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
    raw = info.get("made_of", {}).get("job") or {k: v for k, v in config.items()
                                                 if k != "grid"}
    job = schema.validate(raw, lambda key: str(run_dir / "run.json"))
    grid = schema.Grid(**(config.get("grid") or {}))  # validated when the run started
    return matrix.resolve_seeds(job, info["seed_nonce"]), grid


def position(axes: list[GridAxis], job: Job, name: str | None) -> int | None:
    """Where the axis a grid key names is among ``axes`` (None: unnamed, or not an axis of
    the job as expanded, e.g. a wildcard that gave one value: then the default applies)."""
    keys = schema.grid_axes(job).get(name) if name else None
    return next((i for i, a in enumerate(axes) if a.keys == keys), None)


def check(job: Job, x: str | None, y: str | None, z: str | None, where: str) -> None:
    """Raise JobError if a named axis is not one of the job's (naming those it has)."""
    job = dataclasses.replace(job, grid=schema.Grid(x, y, z))
    if problems := schema.grid_problems(job, lambda key: where):
        raise JobError(problems)


def write_all(run_dir: Path, x: str | None = None, y: str | None = None, z: str | None = None,
              max_megapixels: float | None = None) -> list[Path]:
    """Write the sheets of a run folder as it is now into grids/ and name them in run.json.
    The axes: these, else the job's grid key, else the two longest. No sheets for a job of
    one image. Returns the files written."""
    run_dir = Path(run_dir)
    job, grid = load_job(run_dir)
    if (x, y, z) != (None, None, None):
        check(job, x, y, z, "the command line")
    else:
        x, y, z = grid.x, grid.y, grid.z
    budget = (max_megapixels or grid.max_megapixels) * 1e6
    axes = run_axes(job)
    at = {which: position(axes, job, name) for which, name in (("x", x), ("y", y), ("z", z))}
    if sum(len(a.values) > 1 for a in axes) == 0:
        return []
    entries = manifest.read(run_dir / "manifest.jsonl")
    found = sheets(axes, entries, run_dir, at["x"], at["y"], at["z"])
    w, h = cell_box(found, run_dir, job)
    out = []
    (run_dir / "grids").mkdir(exist_ok=True)
    for n, sheet in enumerate(found, 1):
        legend = legend_lines(sheet, n, len(found))
        lay = layout(sheet, legend, w, h, budget)
        image = draw(sheet, lay, legend, run_dir)
        path = run_dir / "grids" / sheet.name(n if len(found) > 1 else None)
        atomic.write_bytes(path, encode(image, sheet, infotext(sheet, run_dir)))
        out.append(path)
    record_grids(run_dir, [p.relative_to(run_dir).as_posix() for p in out])
    return out


def cell_box(found: list[Sheet], run_dir: Path, job: Job) -> tuple[int, int]:
    """The thumbnails' box before scaling: the largest image there (the job's first-pass
    size when none is there yet)."""
    w = h = 0
    for sheet in found:
        for row in sheet.cells:
            for c in row:
                if c.status == "ok":
                    with Image.open(run_dir / c.file) as im:
                        w, h = max(w, im.width), max(h, im.height)
    if not w:
        w = max(matrix.values(job.params.width))
        h = max(matrix.values(job.params.height))
    return w, h
