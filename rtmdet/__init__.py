"""RTMDet-Ins real-time instance segmentation in plain PyTorch."""

from .build import build
from .checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint, load_mmdet_checkpoint, to_mmdet_state_dict
from .criterion import RTMDetInsCriterion
from .crop_masks import CropMasks
from .model import SIZES, RTMDetIns, build_model, count_parameters
from .outputs import RawOutputs
from .postprocess import InstancePostProcess
from .preprocess import ImageMeta, letterbox, normalize, preprocess
from .tiling import TiledPredictor

__all__ = [
    "SIZES",
    "CheckpointError",
    "CropMasks",
    "ImageMeta",
    "InstancePostProcess",
    "LoadedCheckpoint",
    "RTMDetIns",
    "RTMDetInsCriterion",
    "RawOutputs",
    "TiledPredictor",
    "build",
    "build_model",
    "count_parameters",
    "letterbox",
    "load_checkpoint",
    "load_mmdet_checkpoint",
    "normalize",
    "preprocess",
    "to_mmdet_state_dict",
]
