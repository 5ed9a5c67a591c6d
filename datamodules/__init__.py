"""Data: COCO-format instance segmentation (loading, official transforms, Lightning DataModule)."""

from .coco import CategoryMap, CocoAnnotations, load_image, load_sample
from .collate import collate, finalize_batch
from .datamodule import COCODataModule
from .dataset import CocoDataset
from .errors import DatasetError
from .masks import InstanceMasks, decode_masks
from .pipeline_switch import PipelineSwitch
from .sampler import TrainIndex, TrainSampler
from .transforms import train_pipeline, val_pipeline

__all__ = [
    "COCODataModule",
    "CategoryMap",
    "CocoAnnotations",
    "CocoDataset",
    "DatasetError",
    "InstanceMasks",
    "PipelineSwitch",
    "TrainIndex",
    "TrainSampler",
    "collate",
    "finalize_batch",
    "decode_masks",
    "load_image",
    "load_sample",
    "train_pipeline",
    "val_pipeline",
]
