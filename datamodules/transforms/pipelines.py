"""The official RTMDet-Ins pipelines: training stages 1 and 2, and validation."""

from __future__ import annotations

from .colour import YOLOXHSVRandomAug
from .compose import Compose
from .copy_paste import CopyPaste
from .filtering import FilterAnnotations
from .mixing import CachedMixUp, CachedMosaic
from .spatial import Letterbox, Pad, RandomFlip, RandomResizeCrop


def train_pipeline(stage: int = 1, img_size: int = 640, resize_ratio: tuple[float, float] = (0.5, 2.0),
                   mosaic_cache: int = 20, mixup_cache: int = 10, mixup_prob: float = 0.5,
                   random_pop: bool = False, nearest: bool = False, reject_empty: bool = False,
                   copy_paste_prob: float = 0.0, copy_paste_max_instances: int = 20) -> Compose:
    """Stage 1 (Mosaic ... MixUp, Filter) or stage 2 (no Mosaic/MixUp): mmdet's ``train_pipeline`` and
    ``train_pipeline_stage2``; the defaults are those of the tiny recipe.

    ``copy_paste_prob`` > 0 adds :class:`CopyPaste` to stage 1 after Pad, before MixUp (its cache
    of ``mixup_cache`` samples, popped like the others); at 0 (the official pipeline) the step is
    not there at all, so the samples are those of the official pipeline draw for draw.
    """
    S = img_size
    if stage == 1:
        copy_paste = [CopyPaste(copy_paste_prob, copy_paste_max_instances, max(mixup_cache, 2), random_pop)
                      ] if copy_paste_prob > 0 else []
        return Compose([
            CachedMosaic(S, mosaic_cache, random_pop, nearest=nearest),
            RandomResizeCrop(2 * S, resize_ratio, S, nearest),  # RandomResize(2S * r) -> RandomCrop(S)
            YOLOXHSVRandomAug(),
            RandomFlip(0.5),
            Pad(S),
            *copy_paste,
            CachedMixUp(S, mixup_cache, random_pop, mixup_prob, nearest=nearest),
            FilterAnnotations((1, 1), reject_empty),
        ])
    if stage == 2:
        return Compose([
            RandomResizeCrop(S, resize_ratio, S, nearest),  # RandomResize(S * r) -> RandomCrop(S)
            FilterAnnotations((1, 1), reject_empty),
            YOLOXHSVRandomAug(),
            RandomFlip(0.5),
            Pad(S),
        ])
    raise ValueError(f"stage must be 1 or 2, got {stage}")


def val_pipeline(img_size: int = 640, nearest: bool = False) -> Compose:
    """Letterbox to fit + pad 114 (the test pipeline; normalisation happens on the batch)."""
    return Compose([Letterbox(img_size, nearest)])
