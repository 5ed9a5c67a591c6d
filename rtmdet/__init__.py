"""RTMDet-Ins real-time instance segmentation in plain PyTorch."""

from .checkpoint import CheckpointError, load_mmdet_checkpoint, to_mmdet_state_dict
from .model import SIZES, RawOutputs, RTMDetIns, build_model, count_parameters
from .postprocess import InstancePostProcess
from .preprocess import ImageMeta, letterbox, normalize, preprocess

__all__ = [
    "SIZES",
    "CheckpointError",
    "ImageMeta",
    "InstancePostProcess",
    "RTMDetIns",
    "RawOutputs",
    "build_model",
    "count_parameters",
    "letterbox",
    "load_mmdet_checkpoint",
    "normalize",
    "preprocess",
    "to_mmdet_state_dict",
]
