import math

import pytest
import torch

from rtmdet.ema import ExpMomentumEMA, ema_momentum
from rtmdet.schedule import lr_factor, scaled_lr, warmup_steps_for


def test_official_schedule_shape():
    total, warmup = 300 * 458, 1000  # COCO: 458 iterations per epoch at batch 256
    assert lr_factor(0, total, warmup) == pytest.approx(1e-5)
    assert lr_factor(500, total, warmup) == pytest.approx(1e-5 + (1 - 1e-5) * 0.5)
    assert lr_factor(1000, total, warmup) == 1.0
    assert lr_factor(150 * 458 - 1, total, warmup) == 1.0  # flat until epoch 150
    mid = 150 * 458 + 75 * 458  # halfway through the cosine: (1 + 0.05) / 2
    assert lr_factor(mid, total, warmup) == pytest.approx(0.525)
    assert lr_factor(total, total, warmup) == pytest.approx(0.05)
    assert warmup_steps_for(total) == 1000
    assert warmup_steps_for(200) == 20  # short runs: capped at 10 %
    assert scaled_lr(0.004, 32) == pytest.approx(0.0005)


def test_ema_momentum_ramp():
    # m_t = (1 - 0.0002) exp(-(1 + t) / 2000) + 0.0002: starts near 1, decays to 0.0002.
    assert ema_momentum(0) == pytest.approx(0.9998 * math.exp(-1 / 2000) + 0.0002)
    assert ema_momentum(1999) == pytest.approx(0.9998 * math.exp(-1) + 0.0002)
    assert ema_momentum(10**6) == pytest.approx(0.0002)


def test_ema_average_with_reference_aliasing():
    ema = ExpMomentumEMA()
    avg, cur = torch.zeros(3), torch.ones(3)
    m = ema_momentum(4)
    torch.testing.assert_close(ema._average(avg, cur, torch.tensor(4)), torch.full((3,), m))
    # A tensor the reference updates k times per step (k aliases in its state_dict).
    shared = torch.zeros(3)
    ema._repeats[shared.data_ptr()] = 6
    expected = torch.zeros(3)
    for _ in range(6):
        expected = (1 - m) * expected + m * cur
    torch.testing.assert_close(ema._average(shared, cur, torch.tensor(4)), expected)
    ints = torch.tensor([7])
    assert ema._average(ints, torch.tensor([9]), torch.tensor(4)).item() == 7  # integer buffers kept
