"""A face drawn procedurally that OpenCV's frontal-face and eye cascades really find: a
shaded skin oval with hair, eye sockets, whites, irises, brows, a nose and a mouth on a
blue-grey background (no face photograph ships with the tests)."""

from __future__ import annotations

import cv2
import numpy as np


def eye_centres(size: int = 256, scale: float = 1.0, centre=None) -> tuple:
    cx, cy = centre or (size / 2, size / 2)
    return (cx - 24 * scale, cy - 12 * scale), (cx + 24 * scale, cy - 12 * scale)


def draw_face(size: int = 256, scale: float = 1.0, centre=None) -> np.ndarray:
    """An RGB uint8 picture of one face, ``scale`` 1 making it about 125x160 px."""
    s = scale
    cx, cy = centre or (size / 2, size / 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.empty((size, size, 3), np.float32)
    img[:] = (90, 110, 130)
    img += (yy / size * 30)[..., None]
    d = ((xx - cx) / (62 * s)) ** 2 + ((yy - cy) / (80 * s)) ** 2
    shade = np.clip(1.15 - 0.35 * d, 0, 1.2)[..., None]
    head = d < 1
    img[head] = (np.array([224, 180, 150], np.float32) * shade)[head]
    hair = ((d < 1.08) & (yy < cy - 45 * s)) | ((d < 1.08) & (d > 0.8) & (yy < cy - 10 * s))
    img[hair] = (60, 40, 30)

    def oval(x, y, a, b, colour):
        cv2.ellipse(img, (int(x), int(y)), (int(a), int(b)), 0, 0, 360, colour, -1,
                    cv2.LINE_AA)

    for (ex, ey), side in zip(eye_centres(size, s, (cx, cy)), (-1, 1), strict=True):
        oval(ex, ey - 2 * s, 17 * s, 9 * s, (170, 130, 110))  # socket shadow
        oval(ex, ey, 11 * s, 5 * s, (235, 235, 235))  # white
        oval(ex, ey, 5 * s, 5 * s, (40, 30, 25))  # iris
        inner, outer = ex - side * 10 * s, ex + side * 14 * s
        cv2.line(img, (int(inner), int(ey - 18 * s)), (int(outer), int(ey - 16 * s)),
                 (60, 40, 30), max(1, int(4 * s)), cv2.LINE_AA)  # brow
    oval(cx, cy + 14 * s, 7 * s, 4 * s, (170, 125, 105))  # nose
    cv2.line(img, (int(cx), int(cy - 6 * s)), (int(cx - 3 * s), int(cy + 12 * s)),
             (190, 145, 120), max(1, int(2 * s)), cv2.LINE_AA)
    oval(cx, cy + 38 * s, 18 * s, 5 * s, (150, 60, 60))  # mouth
    img = cv2.GaussianBlur(img, (0, 0), 1.2 * s)
    return np.clip(img, 0, 255).astype(np.uint8)


def draw_landscape(size: int = 256) -> np.ndarray:
    """No face: a sky, a lawn and a red block."""
    img = np.zeros((size, size, 3), np.uint8)
    img[: size // 2] = (110, 160, 230)
    img[size // 2:] = (60, 150, 60)
    img[size // 3: size * 2 // 3, size // 3: size // 2] = (180, 40, 40)
    return img
