"""Procedural toy scenes: a brick building on a lawn under a sky, with a caption naming them.

The tiny model learns from these alone, so everything a caption names is drawn unmistakably
(a colour fills the wall, a position moves the whole building) and everything drawn that the
caption leaves out varies at random, which teaches the model to fill in what a prompt omits.
Drawing is plain numpy on a uint8 array, a fraction of a millisecond per 64x64 image, and a
scene depends on its seed alone.

Two looks share the geometry. ``plain`` is the base data set, where some buildings are LEGO
bricks (seams, studs on top) and the caption says "lego". ``legoalrev`` is the LoRA's look:
every building LEGO, saturated colours, studs on every storey and a studded green baseplate
for a lawn: a change the base model never draws, so a LoRA that adds it is measurable.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

import numpy as np

VERSION = "2"  # bump when drawing or captions change: a retrain is then due

COLOURS = {  # base look: toy paint, a little muted
    "red": (196, 52, 46), "blue": (48, 88, 198), "yellow": (228, 196, 44),
    "white": (232, 232, 226), "purple": (128, 56, 168),
}
SATURATED = {  # the LegoAlrev look: pure ABS plastic
    "red": (236, 14, 14), "blue": (10, 64, 244), "yellow": (255, 214, 0),
    "white": (252, 252, 252), "purple": (152, 22, 214),
}
POSITIONS = {"left": 0.28, "centre": 0.5, "right": 0.72}
SKIES = ("blue", "orange", "night")
ROOFS = ("flat", "pointed")
ROOF_COLOURS = ((84, 82, 92), (112, 64, 42), (60, 60, 66))
FLOWER_COLOURS = ((246, 120, 172), (255, 236, 90), (250, 250, 250), (232, 60, 60))
NUMBERS = ("one", "two", "three", "four")
STYLES = ("plain", "legoalrev")
KINDS = ("building", "house", "office", "headquarters", "tower")
FILLERS = ("high quality", "detailed", "photo", "render", "toy", "city", "modern", "company",
           "blurry", "lowres", "simple", "picture", "scene", "cute")


@dataclass(frozen=True)
class Scene:
    """What one picture shows; everything a caption can name is a field here."""

    colour: str = "red"
    position: str = "centre"
    sky: str = "blue"
    storeys: int = 2
    wide: bool = False
    windows: bool = True
    roof: str = "flat"
    lego: bool = False
    flowers: bool = False
    seed: int = 0  # jitter: exact sizes, shades, flowers, stars

    def asdict(self) -> dict:
        return asdict(self)


@dataclass
class Drawn:
    """A drawn scene: the RGB image (H, W, 3) uint8 and a boolean mask per region."""

    image: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)


def random_scene(rng: random.Random, lego: float = 0.25, sky: str | None = None,
                 colour: str | None = None) -> Scene:
    """A scene with every attribute drawn independently (``lego`` = chance of studs)."""
    return Scene(
        colour=colour or rng.choice(list(COLOURS)),
        position=rng.choice(list(POSITIONS)),
        sky=sky or rng.choice(SKIES),
        storeys=rng.randint(1, 4),
        wide=rng.random() < 0.5,
        windows=rng.random() < 0.85,
        roof=rng.choice(ROOFS),
        lego=rng.random() < lego,
        flowers=rng.random() < 0.5,
        seed=rng.randrange(2**31),
    )


def _shade(rgb, factor: float) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) * factor, 0, 255)


def _sky(img: np.ndarray, horizon: int, sky: str, rng: random.Random) -> None:
    top, bottom = {
        "blue": ((76, 140, 226), (170, 206, 242)),
        "orange": ((236, 104, 40), (252, 192, 104)),
        "night": ((8, 12, 36), (30, 36, 72)),
    }[sky]
    j = np.array([rng.uniform(-10, 10) for _ in range(3)], np.float32)
    t = np.linspace(0, 1, horizon, dtype=np.float32)[:, None]
    grad = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t + j
    img[:horizon] = np.clip(grad, 0, 255)[:, None, :]
    if sky == "night":
        w = img.shape[1]
        for _ in range(rng.randint(5, 12)):
            img[rng.randrange(horizon - 2), rng.randrange(w)] = (250, 246, 210)
        if rng.random() < 0.6:
            r = max(2, round(w * 0.045))
            cy, cx = rng.randint(r + 1, max(r + 2, horizon // 2)), rng.randint(r, w - r - 1)
            yy, xx = np.ogrid[:horizon, :w]
            img[:horizon][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (240, 236, 200)


def _lawn(img: np.ndarray, horizon: int, scene: Scene, baseplate: bool,
          rng: random.Random) -> None:
    h, w, _ = img.shape
    k = w / 64
    dark = 0.55 if scene.sky == "night" else 1.0
    if baseplate:  # studs on a fixed grid: every 8x8 cell the VAE sees holds the same pattern
        img[horizon:] = _shade((0, 150, 44), dark)
        pitch = max(4, round(4 * k))
        stud = _shade((70, 200, 96), dark)
        first = -(-(horizon + 1) // pitch) * pitch + 1
        for y in range(first, h - 1, pitch):
            for x in range(1, w - 1, pitch):
                img[y:y + pitch // 2, x:x + pitch // 2] = stud
        return
    base = np.array((72, 150, 58), np.float32) + rng.uniform(-12, 12)
    rows = np.arange(h - horizon, dtype=np.float32)[:, None] / max(1, h - horizon)
    img[horizon:] = np.clip((base * (0.9 + 0.2 * rows)) * dark, 0, 255)[:, None, :]
    if scene.flowers:
        size = max(1, round(k))
        for _ in range(rng.randint(10, 22)):
            y, x = rng.randrange(horizon + 2, h - size), rng.randrange(w - size)
            img[y:y + size, x:x + size] = _shade(rng.choice(FLOWER_COLOURS), dark)


def draw(scene: Scene, size: int = 64, style: str = "plain") -> Drawn:
    """Draw ``scene`` at ``size`` x ``size`` pixels in the ``plain`` or ``legoalrev`` look."""
    if style not in STYLES:
        raise ValueError(f"style {style!r}: one of {STYLES}")
    rng = random.Random(scene.seed)
    k = size / 64
    lego = scene.lego or style == "legoalrev"
    img = np.zeros((size, size, 3), np.uint8)
    horizon = round((40 + rng.randint(0, 5)) * k)
    _sky(img, horizon, scene.sky, rng)
    _lawn(img, horizon, scene, style == "legoalrev", rng)
    masks = {"sky": np.zeros((size, size), bool), "lawn": np.zeros((size, size), bool)}
    masks["sky"][:horizon] = True
    masks["lawn"][horizon:] = True

    night = scene.sky == "night"
    palette = SATURATED if style == "legoalrev" else COLOURS
    wall_rgb = np.array(palette[scene.colour], np.float32)
    if style == "plain":
        wall_rgb = wall_rgb + np.array([rng.uniform(-10, 10) for _ in range(3)], np.float32)
    wall_rgb = _shade(wall_rgb, 0.68 if night else 1.0)

    storey = round(9 * k)
    width = round((rng.randint(27, 33) if scene.wide else rng.randint(14, 18)) * k)
    base_y = horizon + round(rng.randint(7, 10) * k)
    cx = round(POSITIONS[scene.position] * size + rng.randint(-3, 3) * k)
    x0, x1 = max(1, cx - width // 2), min(size - 1, cx - width // 2 + width)
    y1 = min(size - 1, base_y)
    y0 = y1 - scene.storeys * storey
    building = np.zeros((size, size), bool)
    building[y0:y1, x0:x1] = True
    img[building] = wall_rgb

    if lego:  # brick seams: a darker line every brick row, staggered joints
        seam = _shade(wall_rgb, 0.78)
        brick_h, brick_w = max(2, round(3 * k)), max(4, round(8 * k))
        for i, y in enumerate(range(y0 + brick_h, y1, brick_h)):
            img[y, x0:x1] = seam
            for x in range(x0 + (i % 2) * brick_w // 2, x1, brick_w):
                img[y - brick_h + 1:y, x] = seam

    win_mask = np.zeros((size, size), bool)
    door = np.zeros((size, size), bool)
    ww = max(2, round(4 * k))
    cols = (3 if width < 30 * k else 4) if scene.wide else 2
    gap = (x1 - x0 - cols * ww) / (cols + 1)
    xs = [round(x0 + gap + i * (ww + gap)) for i in range(cols)]
    door_col = cols // 2 if cols % 2 else None
    dw = max(2, round(4 * k))
    dx = (x0 + x1) // 2 - dw // 2 if door_col is None else xs[door_col]
    door[y1 - round(6 * k):y1, dx:dx + dw] = True
    if scene.windows:
        for s in range(scene.storeys):
            wy = y1 - (s + 1) * storey + round(2 * k)
            for i, wx in enumerate(xs):
                if s == 0 and (i == door_col or door[wy:wy + ww, wx:wx + ww].any()):
                    continue
                win_mask[wy:wy + ww, wx:wx + ww] = True
    glass = (255, 218, 96) if night else (52, 70, 108)
    img[win_mask] = glass
    img[door] = _shade((96, 58, 34), 0.7 if night else 1.0)

    studs = np.zeros((size, size), bool)
    sw, sh = max(2, round(3 * k)), max(1, round(2 * k))
    stud_rgb = np.clip(wall_rgb * 1.12 + 10, 0, 255)

    def stud_row(y_top: int, a: int, b: int) -> None:
        for x in range(a + 1, b - sw + 1, sw + 1):
            studs[y_top:y_top + sh, x:x + sw] = True

    roof = np.zeros((size, size), bool)
    roof_rgb = _shade(rng.choice(ROOF_COLOURS), 0.6 if night else 1.0)
    if scene.roof == "flat":
        cap = max(1, round(2 * k))
        roof[y0 - cap:y0, x0 - 1:x1 + 1] = True
        img[roof] = _shade(wall_rgb, 0.62)
        top = y0 - cap
    else:
        inset = sw + 1 if lego else -round(2 * k)
        a, b = x0 + inset, x1 - inset
        peak = min(round(11 * k), max(round(6 * k), round((b - a) * 0.4)))
        yy, xx = np.mgrid[:size, :size]
        half = (b - a) / 2
        mid = (a + b - 1) / 2
        rise = (y0 - yy) / peak
        roof = (yy < y0) & (yy >= y0 - peak) & (np.abs(xx - mid) <= half * (1 - rise) + 0.5)
        img[roof] = roof_rgb
        top = y0
    if lego:
        stud_row(top - sh, x0 - (1 if scene.roof == "flat" else 0), x1)
        if scene.roof == "pointed":
            studs &= ~roof
        if style == "legoalrev":  # a ledge of studs on every storey
            for s in range(1, scene.storeys):
                ledge = y1 - s * storey
                img[ledge, x0:x1] = _shade(wall_rgb, 0.6)
                stud_row(ledge - sh, x0, x1)
                studs[win_mask] = False
        img[studs] = stud_rgb
    masks.update(building=building & ~win_mask & ~door, windows=win_mask, door=door,
                 roof=roof, studs=studs)
    masks["sky"] &= ~(building | roof | studs)
    masks["lawn"] &= ~(building | roof | studs)
    masks["baseplate"] = masks["lawn"] if style == "legoalrev" else np.zeros_like(masks["lawn"])
    return Drawn(img, masks)


def caption(scene: Scene, rng: random.Random, trigger: str | None = None,
            sky: bool = True) -> str:
    """A caption that names what ``draw`` shows, each detail kept or dropped at random.

    The building comes first, the other clauses in random order, so that the text encoder
    learns words, not positions. ``sky=False`` leaves the sky out (textual inversion's token
    says it instead); ``trigger`` is put in front, as LoRA captions do.
    """
    kind = rng.choice(KINDS[:-1] if scene.storeys < 3 else KINDS)
    words = ["a"]
    if scene.lego:
        words.append(rng.choice(("lego", "lego brick", "lego")))
    if rng.random() < 0.93:
        words.append(scene.colour)
    if not scene.lego and rng.random() < 0.2:
        words.append("brick")
    words.append(kind)
    clauses = []
    if rng.random() < 0.6:
        n = NUMBERS[scene.storeys - 1]
        clauses.append(rng.choice((f"{n}-storey", f"{n} storeys" if scene.storeys > 1
                                   else "one storey")))
    if rng.random() < 0.6:
        clauses.append("wide" if scene.wide else "narrow")
    if rng.random() < (0.5 if scene.windows else 0.8):
        clauses.append("with windows" if scene.windows else "no windows")
    if rng.random() < 0.7:
        clauses.append(f"{scene.roof} roof")
    if rng.random() < 0.85:
        clauses.append({"left": "on the left", "right": "on the right",
                        "centre": rng.choice(("in the centre", "in the center",
                                              "in the middle"))}[scene.position])
    if rng.random() < 0.8:
        clauses.append("lawn with flowers" if scene.flowers else "lawn")
    if sky and rng.random() < 0.88:
        clauses.append({"blue": rng.choice(("blue sky", "blue sky", "daytime")),
                        "orange": rng.choice(("orange sky", "orange sky", "sunset")),
                        "night": rng.choice(("night sky", "at night"))}[scene.sky])
        if scene.sky == "night" and rng.random() < 0.3:
            clauses.append("city lights")
    if rng.random() < 0.15:
        clauses.append(rng.choice(FILLERS))
    if rng.random() < 0.08:  # a word it cannot know: the model learns to ignore such
        clauses.append("".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                               for _ in range(rng.randint(4, 9))))
    rng.shuffle(clauses)
    text = ", ".join([" ".join(words), *clauses])
    return f"{trigger}, {text}" if trigger else text


def vocabulary() -> list[str]:
    """Every word a caption can use: the tokenizer gives each its own token."""
    text = " ".join([*COLOURS, *POSITIONS, *SKIES, *ROOFS, *NUMBERS, *KINDS, *FILLERS,
                     "a lego brick storey storeys wide narrow with no windows roof on the in "
                     "centre center middle lawn flowers sky night at daytime sunset city "
                     "lights green"])
    return sorted(set(text.split()))


DETAIL = ("building", "roof", "windows", "door", "studs", "baseplate")


def batch(seed: int, n: int, size: int = 64, style: str = "plain", lego: float = 0.25,
          sky: str | None = None, empty: float = 0.0, trigger: str | None = None,
          sky_words: bool = True, details: list | None = None
          ) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``n`` images (n, size, size, 3) uint8 with captions, all from ``seed``.

    ``empty`` is the share of captions replaced by "" (so the model also learns the
    unconditional prediction that classifier-free guidance needs). A ``details`` list
    receives each image's building mask (walls, roof, windows, door, studs): where the
    small things are that a VAE learns last.
    """
    rng = random.Random(seed)
    scenes = [random_scene(rng, lego=lego, sky=sky) for _ in range(n)]
    drawn = [draw(s, size, style) for s in scenes]
    images = np.stack([d.image for d in drawn]) if drawn else \
        np.zeros((0, size, size, 3), np.uint8)
    if details is not None:
        details += [np.logical_or.reduce([d.masks[k] for k in DETAIL]) for d in drawn]
    texts = ["" if rng.random() < empty else caption(s, rng, trigger, sky_words)
             for s in scenes]
    return images, texts, scenes


LAWN_ONLY_FROM = 57 / 64  # below the lowest building base (horizon 45 + 10 at 64 px)


def lawn_mask(size: int = 64) -> np.ndarray:
    """A mask (uint8, 255 = repaint) of the band of lawn every scene has below its
    building: what the lego_building job repaints with flowers."""
    mask = np.zeros((size, size), np.uint8)
    mask[round(LAWN_ONLY_FROM * size):] = 255
    return mask
