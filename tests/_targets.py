"""Random loss targets for tests: boxes with an elliptical mask inscribed in each."""

from __future__ import annotations

import torch


def ellipse_targets(counts, seed: int, size: int, num_classes: int, max_frac: float = 0.5, min_wh: float = 6.0,
                    never_empty: bool = False) -> list[dict[str, torch.Tensor]]:
    """Per image ``counts[i]`` boxes of side ``min_wh`` to ``min_wh + max_frac * size`` px, each
    with the ellipse inscribed in it as mask ((n, size, size) bool); ``never_empty`` also sets
    the centre pixel, so that boxes under a pixel wide still have one."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    targets = []
    for n in counts:
        wh = torch.rand(n, 2, generator=g) * size * max_frac + min_wh
        xy = torch.rand(n, 2, generator=g) * (size - wh)
        boxes = torch.cat([xy, xy + wh], 1)
        c, r = (boxes[:, :2] + boxes[:, 2:]) / 2, wh / 2
        u = (xx - c[:, 0, None, None]) / r[:, 0, None, None]
        v = (yy - c[:, 1, None, None]) / r[:, 1, None, None]
        masks = u**2 + v**2 <= 1  # (n, size, size) ellipse in the box
        if never_empty:
            masks[torch.arange(n), c[:, 1].long(), c[:, 0].long()] = True
        targets.append({"boxes": boxes, "labels": torch.randint(0, num_classes, (n,), generator=g), "masks": masks})
    return targets
