"""Training and validation transforms of RTMDet-Ins, one small class per step.

The steps and their settings are those of mmdetection's RTMDet-Ins recipes
(``configs/rtmdet/rtmdet-ins_{tiny,s,l}_8xb32-300e_coco.py``).

A sample is a dict (made by ``datamodules.coco.load_sample``):

* ``image``: uint8 (H, W, 3) RGB.
* ``boxes``: float32 (N, 4) xyxy in pixels of ``image``, x2 / y2 exclusive: a mask's box is
  (min col, min row, max col + 1, max row + 1). Every step that resizes, crops or places pixels
  recomputes the boxes from the masks (mmdet's ``recompute_bbox``), so in training box == mask
  extent exactly; only :class:`Letterbox` (validation) scales the annotation boxes.
* ``labels``: int64 (N,). ``masks``: :class:`InstanceMasks` (N, H, W), kept as tight crops.
* ``ignore_boxes``: float32 (M, 4) xyxy crowd regions, moved with the image, never targets.
* ``image_id`` (COCO id), ``orig_size`` (h, w), ``scale_factor`` (w_scale, h_scale): original =
  input / scale_factor after :class:`Letterbox`; in training it only tracks the resize factors.

Every transform is ``t(sample, rng) -> sample`` with a ``numpy.random.Generator``; it may return
``None`` to reject the sample (the dataset draws another). Transforms never write into their
input's arrays: the Mosaic/MixUp caches keep references to earlier samples.

Images are resized bilinearly without antialiasing (as OpenCV ``INTER_LINEAR`` in the official
pipeline) or, with ``nearest=True`` (pixel art), by nearest-neighbour index sampling; masks are
always resized by nearest-neighbour index sampling with pixel centres, like the nearest images.

Where things are:

* ``compose.py``: the sample and transform types, :class:`Compose`.
* ``geometry.py``: what the transforms do to a sample (resize, place on a canvas, pad, flip), no randomness.
* ``spatial.py``: :class:`RandomResize`, :class:`RandomCrop`, :class:`RandomResizeCrop`,
  :class:`RandomFlip`, :class:`Pad`, :class:`Letterbox`.
* ``colour.py``: :func:`hsv_shift` and :class:`YOLOXHSVRandomAug`.
* ``mixing.py``: the multi-image steps with a cache, :class:`CachedMosaic` and :class:`CachedMixUp`.
* ``copy_paste.py``: :class:`CopyPaste` (Ghiasi et al. 2021), an option of stage 1, off in the official pipeline.
* ``filtering.py``: :class:`FilterAnnotations`.
* ``pipelines.py``: the official :func:`train_pipeline` (stages 1 and 2) and :func:`val_pipeline`.
"""

from .colour import YOLOXHSVRandomAug, hsv_shift
from .compose import Compose, Sample, Transform
from .copy_paste import CopyPaste
from .filtering import FilterAnnotations
from .geometry import resize_image
from .mixing import CachedMixUp, CachedMosaic
from .pipelines import train_pipeline, val_pipeline
from .spatial import Letterbox, Pad, RandomCrop, RandomFlip, RandomResize, RandomResizeCrop

__all__ = [
    "CachedMixUp",
    "CachedMosaic",
    "Compose",
    "CopyPaste",
    "FilterAnnotations",
    "Letterbox",
    "Pad",
    "RandomCrop",
    "RandomFlip",
    "RandomResize",
    "RandomResizeCrop",
    "Sample",
    "Transform",
    "YOLOXHSVRandomAug",
    "hsv_shift",
    "resize_image",
    "train_pipeline",
    "val_pipeline",
]
