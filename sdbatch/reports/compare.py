"""How far apart two renders of one recipe are: PSNR, SSIM, the largest pixel difference,
and pictures of where they differ (a heat map, a labelled strip). Pure functions on 8-bit
RGB arrays, shared by `sdbatch verify` and `sdbatch diff`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# SSIM as Wang, Bovik, Sheikh and Simoncelli define it (IEEE TIP 2004): an 11x11 gaussian
# window of sigma 1.5, K1 = 0.01, K2 = 0.03, on the 0..255 range
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2, LEVELS = 11, 1.5, 0.01, 0.03, 255.0


@dataclass(frozen=True)
class Distance:
    psnr: float  # dB; inf when the pixels are equal
    ssim: float  # 1.0 when the pixels are equal
    max_diff: int  # the largest difference of one channel of one pixel, in levels of 255
    mean_diff: float

    @property
    def same(self) -> bool:
        return self.max_diff == 0

    def as_dict(self) -> dict:
        return {"psnr": None if math.isinf(self.psnr) else round(self.psnr, 3),
                "ssim": round(self.ssim, 6), "max_diff": self.max_diff,
                "mean_diff": round(self.mean_diff, 4)}

    def __str__(self) -> str:
        psnr = "inf" if math.isinf(self.psnr) else f"{self.psnr:.2f}"
        return (f"PSNR {psnr} dB, SSIM {self.ssim:.4f}, largest difference {self.max_diff}, "
                f"mean {self.mean_diff:.2f}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two 8-bit images, in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(LEVELS ** 2 / mse)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two 8-bit images (H x W or H x W x C, the channels
    averaged), over the windows that lie wholly inside the image, as the reference code's
    'valid' filtering; at least 11 pixels a side."""
    if a.shape != b.shape:
        raise ValueError(f"SSIM of images of different shapes: {a.shape} and {b.shape}")
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} pixels a side, "
                         f"not {a.shape[1]}x{a.shape[0]}")
    x, y = a.astype(np.float64), b.astype(np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    c1, c2 = (SSIM_K1 * LEVELS) ** 2, (SSIM_K2 * LEVELS) ** 2
    pad = SSIM_WINDOW // 2

    def blur(m: np.ndarray) -> np.ndarray:
        out = cv2.GaussianBlur(m, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA,
                               borderType=cv2.BORDER_REFLECT)
        return out[pad:-pad, pad:-pad]

    values = []
    for c in range(x.shape[2]):
        p, q = x[..., c], y[..., c]
        mp, mq = blur(p), blur(q)
        vp, vq, cov = blur(p * p) - mp * mp, blur(q * q) - mq * mq, blur(p * q) - mp * mq
        m = ((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp * mp + mq * mq + c1) * (vp + vq + c2))
        values.append(float(m.mean()))
    return float(np.mean(values))


def distance(a: np.ndarray, b: np.ndarray) -> Distance:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return Distance(psnr(a, b), ssim(a, b), int(diff.max()), float(diff.mean()))


def rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def heat_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Where two images differ: each pixel's largest channel difference on a fixed scale
    (black: equal; a square root, so that one level shows as dark red and 255 as white),
    the same for every image so that maps compare."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2).astype(np.float64)
    level = np.round(np.sqrt(diff / LEVELS) * 255).astype(np.uint8)
    level[diff > 0] = np.maximum(level[diff > 0], 16)
    colour = cv2.applyColorMap(level, cv2.COLORMAP_INFERNO)
    colour[diff == 0] = 0
    return cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)


LABEL_PX = 14


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default(size=11)


def strip(panels: list[tuple[str, np.ndarray]], caption: str = "",
          height: int | None = None) -> Image.Image:
    """Images side by side, each with its label above, scaled to one height (nearest
    neighbour: pixels stay pixels), with a caption line under them."""
    height = height or max(p.shape[0] for _, p in panels)
    scaled = [(label, Image.fromarray(p).resize(
        (max(1, round(p.shape[1] * height / p.shape[0])), height), Image.NEAREST))
        for label, p in panels]
    gap = 4
    font = _font()
    lines = [line for line in caption.splitlines() if line]
    width = max([sum(im.width for _, im in scaled) + gap * (len(scaled) + 1)]
                + [round(font.getlength(line)) + 2 * gap for line in lines])
    sheet = Image.new("RGB", (width, height + LABEL_PX * (1 + len(lines)) + 2 * gap),
                      (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    x = gap
    for label, im in scaled:
        while len(label) > 1 and font.getlength(label) > im.width:
            label = label[:-2] + "…"
        draw.text((x, gap), label, fill=(230, 230, 230), font=font)
        sheet.paste(im, (x, gap + LABEL_PX))
        x += im.width + gap
    for n, line in enumerate(lines):
        draw.text((gap, gap + LABEL_PX + height + 2 + n * LABEL_PX), line,
                  fill=(230, 230, 230), font=font)
    return sheet


def stack_rows(rows: list[Image.Image]) -> Image.Image:
    """Strips one under the other, on one sheet."""
    width = max(r.width for r in rows)
    sheet = Image.new("RGB", (width, sum(r.height for r in rows)), (32, 32, 32))
    y = 0
    for r in rows:
        sheet.paste(r, (0, y))
        y += r.height
    return sheet
