import numpy as np
import pytest
import torch

from rtmdet.preprocess import MEAN_BGR, STD_BGR, letterbox, normalize, preprocess


def test_normalize_is_bgr_with_official_mean_std():
    rgb = torch.zeros(3, 2, 2, dtype=torch.uint8)
    rgb[0] = 200  # red
    x = normalize(rgb)
    # Channel 2 of the BGR input is red.
    torch.testing.assert_close(x[2], torch.full((2, 2), (200 - MEAN_BGR[2]) / STD_BGR[2]))
    torch.testing.assert_close(x[0], torch.full((2, 2), -MEAN_BGR[0] / STD_BGR[0]))


def test_letterbox_keeps_ratio_and_pads_114():
    img = np.full((100, 50, 3), 7, dtype=np.uint8)
    out, meta = letterbox(img, 64)
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
    assert meta.orig_size == (100, 50) and meta.input_size == (64, 64)
    assert meta.scale_factor == pytest.approx((32 / 50, 64 / 100))
    assert (out[:, :, :32] == 7).all() and (out[:, :, 32:] == 114).all()


def test_preprocess_list_of_sizes_and_nearest():
    a = np.zeros((30, 40, 3), dtype=np.uint8)
    a[::2, ::2] = 255  # a checkerboard-ish pattern that bilinear would blur
    b = torch.zeros(3, 20, 10, dtype=torch.uint8)
    x, metas = preprocess([a, b], size=80, nearest=True)
    assert x.shape == (2, 3, 80, 80) and x.dtype == torch.float32
    assert [m.orig_size for m in metas] == [(30, 40), (20, 10)]
    raw, _ = letterbox(a, 80, nearest=True)
    assert set(raw[:, :60, :80].unique().tolist()) == {0, 255}  # nearest keeps pixel values crisp
    with pytest.raises(ValueError, match="RGB"):
        letterbox(np.zeros((4, 4), dtype=np.uint8))
