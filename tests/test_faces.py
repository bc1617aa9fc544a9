"""The face maths of face restoration on their own: the eye transform onto the FFHQ
template, the crop and paste-back, the feathered paste mask, the blend, and the Haar
detector on a drawn face."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sdbatch import faces

from .synthetic_face import draw_face, draw_landscape, eye_centres


def apply(matrix: np.ndarray, points) -> np.ndarray:
    p = np.asarray(points, np.float32)
    return p @ matrix[:, :2].T + matrix[:, 2]


@pytest.mark.parametrize("eyes", [((100, 120), (150, 118)), ((40, 60), (52, 75)),
                                  ((300, 200), (250, 210))])
def test_similarity_puts_the_eyes_on_the_templates(eyes):
    m = faces.similarity(np.array(eyes, np.float32), faces.TEMPLATE[:2])
    assert np.allclose(apply(m, eyes), faces.TEMPLATE[:2], atol=1e-3)
    a, b = m[:, 0], m[:, 1]  # a similarity: orthogonal columns of equal length
    assert abs(a @ b) < 1e-4 and abs(np.linalg.norm(a) - np.linalg.norm(b)) < 1e-4


def test_a_face_without_eyes_is_aligned_from_its_box():
    box_only = faces.Face((50, 60, 100, 100))
    assert np.allclose(box_only.eye_points(), [[80, 98], [120, 98]])
    m = faces.align_matrix(box_only)
    assert np.allclose(apply(m, box_only.eye_points()), faces.TEMPLATE[:2], atol=1e-3)


def test_crop_then_paste_of_the_same_face_gives_the_picture_back():
    picture = draw_face(256)
    m = faces.align_matrix(faces.Face((56, 56, 148, 148), eye_centres(256)))
    crop = faces.crop(picture, m)
    assert crop.shape == (512, 512, 3)
    back = faces.paste(picture, crop, m)
    # resampled twice inside the face, untouched outside it
    assert np.abs(back - picture).mean() < 2.0
    assert np.array_equal(back[:20].astype(np.uint8), picture[:20])


def test_paste_mask_is_one_inside_zero_outside_with_a_smooth_ramp():
    m = faces.align_matrix(faces.Face((60, 60, 120, 120), ((96, 106), (144, 106))))
    inverse = cv2.invertAffineTransform(m)
    mask = faces.paste_mask(inverse, (256, 256))
    assert mask.shape == (256, 256) and mask.dtype == np.float32
    assert mask.min() >= 0 and mask.max() == pytest.approx(1)
    centre = apply(inverse, [[256, 256]])[0].astype(int)
    assert mask[centre[1], centre[0]] == pytest.approx(1.0)
    assert mask[:10].max() == 0 and mask[:, -10:].max() == 0  # far from the face
    row = mask[centre[1], : centre[0] + 1]  # from the left edge into the face
    ramp = row[(row > 0) & (row < 1)]
    assert len(ramp) >= 4  # feathered over several pixels, not a hard edge
    assert np.all(np.diff(row) >= -1e-6)  # rising all the way in
    side = np.sqrt((mask > 0).sum())
    assert len(ramp) < side / 4  # ... over a band at the edge, not the whole face


def test_paste_mask_ramp_grows_with_the_face():
    def ramp_width(scale: float) -> int:
        m = faces.similarity(np.array([[256 - 24 * scale, 256], [256 + 24 * scale, 256]],
                                      np.float32), faces.TEMPLATE[:2])
        row = faces.paste_mask(cv2.invertAffineTransform(m), (512, 512))[256]
        assert row[0] == 0 and row[-1] == 0 and row.max() == pytest.approx(1)
        return int(((row > 0) & (row < 0.999)).sum())

    assert ramp_width(1.5) > ramp_width(0.75)


def test_blend_by_visibility():
    a = np.zeros((4, 4, 3), np.uint8)
    b = np.full((4, 4, 3), 200, np.uint8)
    assert np.array_equal(faces.blend(a, b, 0.0), a)
    assert np.array_equal(faces.blend(a, b, 1.0), b)
    assert np.array_equal(faces.blend(a, b, 0.25), np.full((4, 4, 3), 50, np.uint8))


@pytest.mark.parametrize(("scale", "centre"), [(1.0, None), (0.6, (70, 90)), (1.3, None)])
def test_the_haar_cascades_find_a_drawn_face_and_its_eyes(scale, centre):
    [face] = faces.detect(draw_face(256, scale, centre))
    x, y, w, h = face.box
    for (ex, ey), (tx, ty) in zip(face.eyes, eye_centres(256, scale, centre), strict=True):
        assert abs(ex - tx) < 4 * scale + 1 and abs(ey - ty) < 4 * scale + 1
        assert x < ex < x + w and y < ey < y + h


def test_two_faces_are_two_and_a_landscape_has_none():
    two = np.concatenate([draw_face(256, 0.8), draw_face(256, 0.8)], axis=1)
    assert len(faces.detect(two)) == 2
    assert faces.detect(draw_landscape()) == []


def test_a_small_picture_is_searched_scaled_up_as_facexlib_does():
    small = cv2.resize(draw_face(256), (96, 96), interpolation=cv2.INTER_AREA)
    [face] = faces.detect(small)
    assert 15 < face.box[2] < 70


def test_an_opencv_without_cascades_is_named_with_the_fix(monkeypatch):
    assert faces.detector_problem() is None
    monkeypatch.setattr(faces.cv2.data, "haarcascades", "/nowhere/")
    assert "opencv-python-headless<5" in faces.detector_problem()
    with pytest.raises(RuntimeError, match="no Haar cascades"):
        faces.detect(draw_face(64))
