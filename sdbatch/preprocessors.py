"""ControlNet control images as the sd-webui-controlnet extension makes them, with opencv
only: the model-free preprocessors, pixel perfect's resolution, and the control map brought
to a stage's size by the unit's resize mode. Pure functions on uint8 HWC RGB arrays.

Preprocessors that use ``processor_res`` first scale the picture so its short side is that
many pixels (padded to a multiple of 64 at the edge, the pad removed after), as the
extension's ``resize_image_with_pad``; canny is then exactly ``cv2.Canny(low, high)`` on
that picture.
"""

from __future__ import annotations

import cv2
import numpy as np

from sdbatch.preprocessor_names import PREPROCESSORS, canonical

SOFT_FACTOR = 0.825  # the extension's soft injection: residual i of 13 gets 0.825^(12 - i)


def hwc3(x: np.ndarray) -> np.ndarray:
    """Any uint8 picture as H x W x 3 (grey repeated, alpha composited onto white)."""
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    if x.shape[2] == 4:
        color, alpha = x[:, :, :3].astype(np.float32), x[:, :, 3:].astype(np.float32) / 255.0
        return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return x


def resize_with_pad(img: np.ndarray, resolution: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The picture with its short side scaled to ``resolution`` (cubic up, area down),
    edge-padded to multiples of 64; and the unpadded (h, w)."""
    img = hwc3(img)
    h, w = img.shape[:2]
    k = float(resolution) / float(min(h, w))
    th, tw = int(np.round(h * k)), int(np.round(w * k))
    img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA)
    pad_h, pad_w = -th % 64, -tw % 64
    return np.pad(img, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge"), (th, tw)


def canny(img: np.ndarray, res: int, low: float, high: float) -> np.ndarray:
    padded, (h, w) = resize_with_pad(img, res)
    return hwc3(cv2.Canny(padded, int(low), int(high))[:h, :w])


def invert(img: np.ndarray) -> np.ndarray:
    return 255 - hwc3(img)


def threshold(img: np.ndarray, res: int, level: float) -> np.ndarray:
    """White where every channel is above ``level``, black elsewhere."""
    padded, (h, w) = resize_with_pad(img, res)
    out = np.zeros_like(padded)
    out[np.min(padded, axis=2) > level] = 255
    return out[:h, :w]


def scribble_xdog(img: np.ndarray, res: int, level: float) -> np.ndarray:
    """White scribble lines from a difference of Gaussians (the extension's scribble_xdog)."""
    padded, (h, w) = resize_with_pad(img, res)
    g1 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    g2 = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    out = np.zeros_like(padded)
    out[2 * (255 - dog) > level] = 255
    return out[:h, :w]


def lineart_standard(img: np.ndarray, res: int) -> np.ndarray:
    """Lines that are darker than their blurred surroundings, white on black, scaled by the
    median line strength (the extension's lineart_standard)."""
    padded, (h, w) = resize_with_pad(img, res)
    x = padded.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    strong = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(strong)) if strong.size else 16.0)
    intensity *= 127
    return hwc3(intensity.clip(0, 255).astype(np.uint8)[:h, :w])


def recolor_luminance(img: np.ndarray, gamma: float) -> np.ndarray:
    """Brightness as grey: the L of Lab, gamma corrected. Like the extension it converts
    with COLOR_BGR2LAB on an RGB array (it weights red and blue the other way round)."""
    return _grey(cv2.cvtColor(hwc3(img), cv2.COLOR_BGR2LAB)[:, :, 0], gamma)


def recolor_intensity(img: np.ndarray, gamma: float) -> np.ndarray:
    """Intensity as grey: the V of HSV (the largest channel), gamma corrected."""
    return _grey(cv2.cvtColor(hwc3(img), cv2.COLOR_BGR2HSV)[:, :, 2], gamma)


def _grey(channel: np.ndarray, gamma: float) -> np.ndarray:
    out = (channel.astype(np.float32) / 255.0) ** gamma
    return cv2.cvtColor((out * 255.0).clip(0, 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)


def tile_resample(img: np.ndarray, rate: float) -> np.ndarray:
    """The picture's colours, shrunk by ``rate`` (below 1.1: as it is)."""
    img = hwc3(img)
    if rate < 1.1:
        return img
    h, w = img.shape[:2]
    return cv2.resize(img, (int(w / rate), int(h / rate)), interpolation=cv2.INTER_AREA)


def run(name: str, img: np.ndarray, res: int, a: float, b: float) -> np.ndarray:
    """The control map of preprocessor ``name`` (the extension's name or an alias)."""
    name = canonical(name)
    if name not in PREPROCESSORS:
        raise ValueError(f"unknown preprocessor {name!r}")
    return {
        "none": lambda: hwc3(img),
        "canny": lambda: canny(img, res, a, b),
        "invert": lambda: invert(img),
        "threshold": lambda: threshold(img, res, a),
        "scribble_xdog": lambda: scribble_xdog(img, res, a),
        "lineart_standard": lambda: lineart_standard(img, res),
        "recolor_luminance": lambda: recolor_luminance(img, a),
        "recolor_intensity": lambda: recolor_intensity(img, a),
        "tile_resample": lambda: tile_resample(img, a),
    }[name]()


def _resize(x: np.ndarray, w: int, h: int) -> np.ndarray:
    """The extension's control-map resize: few colours (2 < n < 200) nearest, shrinking by
    area, growing by cubic; a black-and-white map is thresholded again (Otsu) so its lines
    stay lines. (The extension also thins one-pixel edges after growing; sdbatch does not.)"""
    if x.shape[0] == h and x.shape[1] == w:
        return x
    packed = (x[:, :, 0].astype(np.int32) << 16) | (x[:, :, 1].astype(np.int32) << 8) \
        | x[:, :, 2]
    colours = len(np.unique(packed))
    binary = colours == 2 and x.min() < 16 and x.max() > 240
    if 2 < colours < 200:
        interpolation = cv2.INTER_NEAREST
    elif w * h < x.shape[0] * x.shape[1]:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    y = cv2.resize(x, (w, h), interpolation=interpolation)
    if binary:
        grey = np.mean(y.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
        _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        y = np.stack([grey] * 3, axis=2)
    return y


def fit(detected: np.ndarray, resize_mode: str, w: int, h: int) -> np.ndarray:
    """A control map at a stage's w x h, by the unit's resize mode: just_resize stretches,
    crop_and_resize covers and cuts the overhang (centred), resize_and_fill fits inside and
    fills the rest with the median colour of the map's border."""
    detected = hwc3(detected)
    if resize_mode == "just_resize":
        return _resize(detected, w, h)
    old_h, old_w = detected.shape[:2]
    k0, k1 = float(h) / old_h, float(w) / old_w
    if resize_mode == "resize_and_fill":
        k = min(k0, k1)
        borders = np.concatenate([detected[0], detected[-1], detected[:, 0], detected[:, -1]])
        colour = np.median(borders, axis=0).astype(detected.dtype)
        out = np.tile(colour[None, None], [h, w, 1])
        inner = _resize(detected, int(np.round(old_w * k)), int(np.round(old_h * k)))
        nh, nw = inner.shape[:2]
        top, left = max(0, (h - nh) // 2), max(0, (w - nw) // 2)
        out[top:top + nh, left:left + nw] = inner
        return out
    k = max(k0, k1)
    outer = _resize(detected, int(np.round(old_w * k)), int(np.round(old_h * k)))
    nh, nw = outer.shape[:2]
    top, left = max(0, (nh - h) // 2), max(0, (nw - w) // 2)
    return np.ascontiguousarray(outer[top:top + h, left:left + w])


def control_scales(weight: float, count: int, soft: bool) -> list[float]:
    """Each residual's factor (down blocks first, the mid block last): the unit's weight,
    or with soft injection the extension's 0.825^(12 - i) times it, for residual i of the
    13 an SD1.x ControlNet gives (an SDXL one gives 10 and takes the first 10 factors)."""
    if not soft:
        return [weight] * count
    return [weight * SOFT_FACTOR ** float(12 - i) for i in range(count)]
