"""Pixel-exact mask refinement (rtmdet/refine.py) on synthetic pixel-art sprites."""

import numpy as np
import pytest
import torch

from rtmdet.crop_masks import CropMasks
from rtmdet.refine import dilate, refine_masks

BODY, EYE = (220, 60, 40), (20, 20, 30)


def sprite(h=64, w=64, x0=20, y0=16):
    """A 16 x 14 creature: a body with a see-through hole, a 1-px antenna and an eye of another colour."""
    shape = np.zeros((14, 16), bool)
    shape[3:14, 2:14] = True
    shape[7:10, 6:9] = False  # the hole shows the background
    shape[0:3, 11] = True  # 1-px antenna
    shape[13, 2] = shape[13, 13] = False  # notched corners
    eye = np.zeros_like(shape)
    eye[5, 4] = True
    full = np.zeros((h, w), bool)
    full[y0:y0 + 14, x0:x0 + 16] = shape
    eyes = np.zeros((h, w), bool)
    eyes[y0:y0 + 14, x0:x0 + 16] = eye
    return full, eyes


def scene(background):
    full, eyes = sprite(*background.shape[:2])
    image = background.copy()
    image[full] = BODY
    image[eyes] = EYE
    return image, full


def checker(h=64, w=64, a=(90, 150, 230), b=(100, 160, 240)):
    yy, xx = np.mgrid[0:h, 0:w]
    return np.where(((yy // 4 + xx // 4) % 2)[..., None] == 1, np.uint8(a), np.uint8(b)).astype(np.uint8)


def blob(mask, r=2):
    """What stride-8 prototypes give: the sprite grown by r px, hole filled, corners rounded."""
    grown = dilate(mask, r)
    ys, xs = np.nonzero(mask)
    filled = grown.copy()
    filled[ys.min():ys.max() + 1, xs.min():xs.max() + 1] |= True  # hole and notches filled
    filled[ys.min() - r, xs.min() - r] = filled[ys.max() + r, xs.max() + r] = False
    return filled


def crop_masks(*dense):
    return CropMasks.from_dense(torch.from_numpy(np.stack(dense)))


def test_blurred_dilated_mask_snaps_to_the_sprite_pixels():
    image, truth = scene(checker())
    pred = blob(truth, 2)
    assert (pred & ~truth).sum() > 50 and pred[truth].all()
    out = refine_masks(image, crop_masks(pred)).to_dense()[0].numpy()
    np.testing.assert_array_equal(out, truth)  # hole open, antenna and notches exact, spill gone


def test_a_mask_one_pixel_short_gets_its_edge_back():
    image, truth = scene(checker())
    eroded = truth & ~dilate(~truth, 1)  # the prediction misses the sprite's outline
    eroded[16:19, 31] = False  # and the antenna's tip beyond one pixel of reach stays out
    out = refine_masks(image, crop_masks(eroded | blob(truth, 0) & truth)).to_dense()[0].numpy()
    np.testing.assert_array_equal(out, truth)


def test_boxes_widen_the_window_and_frames_are_kept():
    image, truth = scene(checker(80, 96))
    pred = blob(truth, 1)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 40.0]])
    out = refine_masks(image, crop_masks(pred), boxes)
    assert out.size == (80, 96) and len(out) == 1
    np.testing.assert_array_equal(out.to_dense()[0].numpy(), truth)
    ys, xs = np.nonzero(truth)
    assert out.regions[0].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


def test_sprite_on_a_background_of_its_own_colour_is_left_as_predicted():
    bg = np.broadcast_to(np.uint8(BODY), (64, 64, 3)).copy()
    image, truth = scene(bg)
    pred = blob(truth, 2)
    out = refine_masks(image, crop_masks(pred)).to_dense()[0].numpy()
    np.testing.assert_array_equal(out, pred)


def test_noise_image_and_empty_masks_are_left_alone():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 48, 3)).astype(np.uint8)  # a photo: every colour (nearly) unique
    pred = np.zeros((48, 48), bool)
    pred[10:30, 12:25] = True
    empty = np.zeros((48, 48), bool)
    out = refine_masks(image, crop_masks(pred, empty)).to_dense().numpy()
    np.testing.assert_array_equal(out[0], pred)
    assert not out[1].any()


def test_a_neighbour_of_the_same_colours_is_not_taken():
    bg = checker()
    image, truth = scene(bg)
    other = np.roll(truth, 19, axis=1)  # the same sprite 3 px to the right of this one
    image[other] = BODY
    out = refine_masks(image, crop_masks(blob(truth, 2))).to_dense()[0].numpy()
    np.testing.assert_array_equal(out, truth)


def test_an_8px_sprite_in_a_blob_three_times_its_size():
    image = checker()
    truth = np.zeros((64, 64), bool)
    truth[30:38, 30:38] = True
    truth[33:35, 30] = False  # a notch
    image[truth] = BODY
    pred = np.zeros((64, 64), bool)
    pred[26:42, 26:42] = True  # 256 px predicted for 62 px of sprite
    out = refine_masks(image, crop_masks(pred)).to_dense()[0].numpy()
    np.testing.assert_array_equal(out, truth)


def test_boundary_f_score_known_values():
    from benchmarks.refine_masks import boundary, boundary_f

    a = np.zeros((20, 20), bool)
    a[5:15, 5:15] = True
    assert boundary(a).sum() == 36 and boundary_f(a, a) == 1.0
    shifted = np.roll(a, 1, axis=1)  # one pixel off: within a 1-px tolerance, not within 0
    assert boundary_f(shifted, a, 1) == 1.0
    # at 0 px the shared boundary pixels: top and bottom rows minus their two end pixels (2 x 9)
    # plus none of the columns; precision = recall = 18 / 36
    assert boundary_f(shifted, a, 0) == pytest.approx(18 / 36)
    far = np.zeros_like(a)
    far[0:3, 0:3] = True
    assert boundary_f(far, a, 1) == 0.0
