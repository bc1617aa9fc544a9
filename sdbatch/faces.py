"""Faces for face restoration, the WebUI's way (facexlib's FaceRestoreHelper as its
face_restoration_utils drives it), with a detector whose weights ship inside OpenCV.

Each face is found by OpenCV's Haar cascades (frontal face, then eyes inside it), aligned by
a similarity transform that puts its eye centres on the FFHQ 512 template's, cropped at
512x512 (the border filled with facexlib's grey), restored by the caller, and pasted back
through the inverse transform with facexlib's feathered mask: 1 well inside the face, 0
outside it, a Gaussian ramp between whose width grows with the face. Pixels away from every
face keep their bytes.

Everything but ``detect`` is plain maths on arrays, tested on its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import cv2
import numpy as np

FACE_SIZE = 512
# facexlib's five landmarks (eyes, nose, mouth corners) of an aligned FFHQ face at 512 px;
# the eyes are the first two (left and right as seen in the picture)
TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                     [201.26117, 371.41043], [313.08905, 371.15118]], np.float32)
BORDER = (132, 133, 135)  # facexlib's warp border, (135, 133, 132) in its BGR, here RGB
# where the eyes sit in a Haar frontal-face box when the eye cascade finds none
EYES_IN_BOX = ((0.30, 0.38), (0.70, 0.38))
DETECT_SHORT_SIDE = 640  # facexlib detects with the short side scaled up to 640 px


@dataclass(frozen=True)
class Face:
    """A face found in a picture: its box (x, y, w, h) and its eye centres (left, right as
    seen), None when the eye cascade found no pair."""

    box: tuple[float, float, float, float]
    eyes: tuple[tuple[float, float], tuple[float, float]] | None = None

    def eye_points(self) -> np.ndarray:
        """The eye centres, measured or placed where they sit in a Haar box."""
        if self.eyes is not None:
            return np.array(self.eyes, np.float32)
        x, y, w, h = self.box
        return np.array([[x + fx * w, y + fy * h] for fx, fy in EYES_IN_BOX], np.float32)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 similarity transform (rotation, uniform scale, shift) taking the two points
    ``src`` exactly onto the two points ``dst``."""
    s = complex(*(src[1] - src[0]))
    d = complex(*(dst[1] - dst[0]))
    r = d / s  # rotation and scale as one complex factor
    t = complex(*dst[0]) - r * complex(*src[0])
    return np.array([[r.real, -r.imag, t.real], [r.imag, r.real, t.imag]], np.float32)


def align_matrix(face: Face) -> np.ndarray:
    """The transform from the picture to the face's 512x512 aligned crop."""
    return similarity(face.eye_points(), TEMPLATE[:2])


def crop(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The aligned 512x512 face (RGB uint8) for ``matrix`` from align_matrix."""
    return cv2.warpAffine(image, matrix, (FACE_SIZE, FACE_SIZE),
                          borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER)


def paste_mask(inverse: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """facexlib's soft paste mask (its path without a face parser), float32 (h, w) in 0..1,
    for the crop warped into a picture of ``size`` (w, h) by ``inverse``."""
    return feather(_face_square(inverse, size))


def _face_square(inverse: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The crop's square warped into the picture, eroded 2 px to drop the warp's dark rim."""
    square = cv2.warpAffine(np.ones((FACE_SIZE, FACE_SIZE), np.float32), inverse, size)
    return cv2.erode(square, np.ones((2, 2), np.uint8))


def feather(square: np.ndarray) -> np.ndarray:
    """The square eroded by twice the edge width and blurred over it, where the edge width
    is a twentieth of the side of a square of the face's area: 1 well inside, 0 outside."""
    edge = int(float(square.sum()) ** 0.5) // 20
    if edge == 0:
        return square
    centre = cv2.erode(square, np.ones((edge * 2, edge * 2), np.uint8))
    return cv2.GaussianBlur(centre, (edge * 2 + 1, edge * 2 + 1), 0)


def paste(image: np.ndarray, restored: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``restored`` (a 512x512 RGB face) pasted into ``image`` (RGB, float32 or uint8)
    through the inverse of ``matrix``; float32 out, as facexlib composites."""
    h, w = image.shape[:2]
    inverse = cv2.invertAffineTransform(matrix)
    face = cv2.warpAffine(restored, inverse, (w, h)).astype(np.float32)
    square = _face_square(inverse, (w, h))
    soft = feather(square)[:, :, None]
    return soft * (square[:, :, None] * face) + (1 - soft) * image.astype(np.float32)


def blend(source: np.ndarray, restored: np.ndarray, visibility: float) -> np.ndarray:
    """PIL's Image.blend of two uint8 pictures, as the WebUI mixes a restorer's result in
    by its visibility (0 = the source, 1 = the restored)."""
    from PIL import Image

    if visibility >= 1:
        return restored
    return np.asarray(Image.blend(Image.fromarray(source), Image.fromarray(restored),
                                  visibility))


CASCADES = ("haarcascade_frontalface_default.xml", "haarcascade_eye.xml")


def detector_problem() -> str | None:
    """Why faces cannot be searched here (OpenCV without its Haar cascades), or None."""
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if hasattr(cv2, "CascadeClassifier") and folder and \
            all(os.path.isfile(folder + name) for name in CASCADES):
        return None
    return (f"OpenCV {cv2.__version__} has no Haar cascades (5.x wheels ship none), which "
            "face restoration finds faces with: install opencv-python-headless 4.x "
            "(pip install 'opencv-python-headless<5')")


def _cascade(name: str) -> cv2.CascadeClassifier:
    if problem := detector_problem():
        raise RuntimeError(problem)
    return cv2.CascadeClassifier(cv2.data.haarcascades + name)


def detect(image: np.ndarray) -> list[Face]:
    """Frontal faces of an RGB uint8 picture, each with its eyes where the eye cascade finds
    one in each upper half of the box, left to right and top to bottom. The picture is
    searched with its short side scaled up to 640 px, as facexlib searches."""
    scale = max(1.0, DETECT_SHORT_SIDE / min(image.shape[:2]))
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if scale > 1:
        gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    eye_cascade = _cascade(CASCADES[1])
    faces = []
    for x, y, w, h in _cascade(CASCADES[0]).detectMultiScale(
            gray, scaleFactor=1.1, minNeighbors=5):
        eyes = _eyes(eye_cascade.detectMultiScale(gray[y:y + h * 6 // 10, x:x + w], 1.1, 3), w)
        found = None if eyes is None else tuple((float(x + ex) / scale, float(y + ey) / scale)
                                                for ex, ey in eyes)
        faces.append(Face(tuple(float(v) / scale for v in (x, y, w, h)), found))
    return sorted(faces, key=lambda f: (f.box[1], f.box[0]))


def _eyes(boxes, width: int) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The largest eye box in each half of the face, as centres; None without a pair."""
    halves: list[list[tuple[float, float, float]]] = [[], []]
    for ex, ey, ew, eh in boxes:
        cx, cy = float(ex + ew / 2), float(ey + eh / 2)
        halves[int(cx >= width / 2)].append((ew * eh, cx, cy))
    if not all(halves):
        return None
    left, right = (max(h)[1:] for h in halves)
    return left, right
