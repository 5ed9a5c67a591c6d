"""COCODataModule end to end: batches, normalisation, workers, and the stage-2 switch callback."""

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import (COCODataModule, InstanceMasks, PipelineSwitch, TrainIndex, TrainSampler, collate,
                         finalize_batch)
from rtmdet.preprocess import STD_BGR, MEAN_BGR, letterbox, normalize
from tests._coco_factory import make_coco

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:The dirpath has changed"),
              pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`"),
              pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)`")]

S = 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return make_coco(root, num_images=6, size=(40, 56), instances=4, cat_ids=(5, 9), crowd=True, empty_images=1)


def make_dm(data, **kw):
    ann, img = data
    args = dict(img_size=S, batch_size=3, num_workers=0, val_batch_size=2, mosaic_cache=5, mixup_cache=3,
                mixup_prob=1.0, seed=0)
    args.update(kw)
    return COCODataModule(str(ann), str(img), str(ann), str(img), **args)


def check_batch(batch, batch_size, finalized=True):
    """The documented batch format (``finalized``: after on_after_batch_transfer / finalize_batch)."""
    images, targets = batch
    assert images.dtype == (torch.float32 if finalized else torch.uint8)
    assert images.shape == (batch_size, 3, S, S) and len(targets) == batch_size
    for t in targets:
        assert set(t) == {"boxes", "labels", "masks", "ignore_boxes", "image_id", "orig_size", "scale_factor", "meta"}
        n = len(t["labels"])
        assert t["boxes"].dtype == torch.float32 and t["boxes"].shape == (n, 4)
        assert t["labels"].dtype == torch.int64 and ((t["labels"] >= 0) & (t["labels"] < 2)).all()
        if finalized:
            assert isinstance(t["masks"], torch.Tensor) and t["masks"].dtype == torch.bool
        else:
            assert isinstance(t["masks"], InstanceMasks)
        assert tuple(t["masks"].shape) == (n, S, S)
        assert t["ignore_boxes"].dtype == torch.float32 and t["ignore_boxes"].shape[1] == 4
        assert isinstance(t["image_id"], int) and t["orig_size"] == (40, 56)
        assert len(t["scale_factor"]) == 2
        assert ((t["boxes"] >= 0) & (t["boxes"] <= S)).all()


def mask_extents(masks: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(InstanceMasks.from_array(masks.numpy()).boxes())


def test_metadata_available_after_init(data):
    dm = make_dm(data)
    assert dm.num_classes == 2 and dm.class_names == ("class_5", "class_9")
    assert dm.cat_id_to_label == {5: 0, 9: 1} and dm.label_to_cat_id == {0: 5, 1: 9}
    assert dm.batch_size == 3 and dm.train_dataset is None
    assert dm.validate_images() == []


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_and_val_batches(data, num_workers):
    dm = make_dm(data, num_workers=num_workers)
    dm.setup("fit")
    raw = [b for _, b in zip(range(2), dm.train_dataloader())]
    for batch in raw:
        check_batch(batch, 3, finalized=False)
        final = dm.on_after_batch_transfer(batch, 0)  # what training_step receives
        check_batch(final, 3)
        torch.testing.assert_close(final[0], normalize(batch[0]))
        for t, r in zip(final[1], batch[1]):
            np.testing.assert_array_equal(t["masks"].numpy(), r["masks"].to_array())
            # boxes are the exact extents of the masks after the training pipeline
            torch.testing.assert_close(t["boxes"], mask_extents(t["masks"]))
    val = next(iter(dm.val_dataloader()))
    check_batch(val, 2, finalized=False)
    record = dm.val_annotations.records[0]
    padded, meta = letterbox(np.array(Image.open(record.path).convert("RGB")), S)
    torch.testing.assert_close(val[0][0], padded)
    images, targets = finalize_batch(val)
    check_batch((images, targets), 2)
    t = targets[0]
    assert t["image_id"] == record.image_id and t["scale_factor"] == meta.scale_factor
    torch.testing.assert_close(t["boxes"], torch.from_numpy(record.boxes) * torch.tensor(meta.scale_factor * 2))
    assert (mask_extents(t["masks"]) - t["boxes"]).abs().max() <= 1.0


def test_finalize_batch_and_collate_of_empty_samples():
    sample = {"image": np.full((S, S, 3), 114, np.uint8), "boxes": np.zeros((0, 4), np.float32),
              "labels": np.zeros(0, np.int64), "masks": InstanceMasks.empty(S, S),
              "ignore_boxes": np.zeros((0, 4), np.float32), "image_id": 3, "orig_size": (5, 6), "scale_factor": (1, 1)}
    images, targets = collate([sample, sample])
    x, targets = finalize_batch((images, targets))
    assert targets[0]["masks"].shape == (0, S, S) and targets[0]["masks"].dtype == torch.bool
    expected = (114 - torch.tensor(MEAN_BGR)) / torch.tensor(STD_BGR)
    torch.testing.assert_close(x[0, :, 0, 0], expected)


def test_sampler_tags_indices_with_the_stage_and_the_epoch_stream():
    stage = [1]
    s = TrainSampler(5, seed=3, get_stage=lambda: stage[0], rank=1)
    first = list(s)
    assert sorted(i for i, _, _ in first) == list(range(5)) and {st for _, st, _ in first} == {1}
    assert {stream for _, _, stream in first} == {(3, 1, 0)}  # (seed, rank, epoch)
    stage[0] = 2  # read when an epoch's iteration starts
    assert list(s) == [TrainIndex(i, 2, (3, 1, 0)) for i, _, _ in first]  # same epoch: same order
    s.set_epoch(1)
    second = list(s)
    assert [i for i, _, _ in second] != [i for i, _, _ in first] and second[0].stream == (3, 1, 1)
    s.set_epoch(0)
    assert [i for i, _, _ in s] == [i for i, _, _ in first]  # the order is a function of (seed, epoch)
    assert [i for i, _, _ in TrainSampler(5, seed=3, rank=0)] == [i for i, _, _ in first]  # not of the rank


def epoch_batches(loader, epoch: int) -> list:
    """The batches of one epoch, in Lightning's order: ``iter()`` first, then ``set_epoch``."""
    it = iter(loader)
    loader.sampler.set_epoch(epoch)
    return [(images, [(t["image_id"], t["boxes"], t["masks"].to_array()) for t in targets]) for images, targets in it]


def assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (images_a, targets_a), (images_b, targets_b) in zip(a, b):
        assert torch.equal(images_a, images_b)
        for (id_a, boxes_a, masks_a), (id_b, boxes_b, masks_b) in zip(targets_a, targets_b):
            assert id_a == id_b and torch.equal(boxes_a, boxes_b) and np.array_equal(masks_a, masks_b)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epochs_samples_depend_on_the_seed_and_the_epoch_only(data, num_workers):
    """Epoch 1 made after epoch 0 (persistent workers, Mosaic/MixUp caches full) equals epoch 1 made
    first by a fresh datamodule, as after a resume; the DataModule's state carries the seed."""
    dm = make_dm(data, num_workers=num_workers, seed=None)
    torch.manual_seed(5)  # a seed=None datamodule takes torch's seed when training starts
    loader = dm.train_dataloader()
    first, second = epoch_batches(loader, 0), epoch_batches(loader, 1)
    assert not torch.equal(first[0][0], second[0][0])
    assert dm.state_dict() == {"seed": 5, "train_stage": 1}

    resumed = make_dm(data, num_workers=num_workers, seed=None)
    torch.manual_seed(6)
    resumed.load_state_dict(dm.state_dict())
    assert_same_batches(epoch_batches(resumed.train_dataloader(), 1), second)


def test_resuming_with_another_explicit_seed_keeps_the_checkpoints(data):
    dm = make_dm(data, seed=3)
    with pytest.warns(UserWarning, match="checkpoint's data seed 7"):
        dm.load_state_dict({"seed": 7, "train_stage": 2})
    assert (dm.seed, dm.train_stage) == (7, 2)


class Marker:
    """A stand-in pipeline: an empty S x S sample whose pixels encode the pipeline's stage (and
    whether a worker process made it)."""

    def __init__(self, stage):
        self.stage = stage

    def __call__(self, sample, rng):
        value = 40 * self.stage + (10 if torch.utils.data.get_worker_info() is not None else 0)
        return dict(sample, image=np.full((S, S, 3), value, np.uint8), boxes=np.zeros((0, 4), np.float32),
                    labels=np.zeros(0, np.int64), masks=InstanceMasks.empty(S, S),
                    ignore_boxes=np.zeros((0, 4), np.float32))


class StageRecorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []
        self.in_worker = set()

    def training_step(self, batch, batch_idx):
        images, _ = batch
        assert images.dtype == torch.float32  # normalised by the datamodule's on_after_batch_transfer
        raw = int((images[:, 0] * STD_BGR[0] + MEAN_BGR[0]).round().unique().item())  # channel 0 is blue
        self.seen.append((self.current_epoch, raw // 40))
        self.in_worker.add(raw % 40 == 10)
        return (self.w ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(dm, max_epochs, callbacks, tmp_path, ckpt_path=None):
    dm.setup("fit")
    dm.train_dataset.pipeline, dm.train_dataset.stage2_pipeline = Marker(1), Marker(2)
    model = StageRecorder()
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=callbacks, limit_train_batches=2, limit_val_batches=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    assert model.in_worker == {dm.hparams.num_workers > 0}
    return sorted(set(model.seen))


def test_pipeline_switch_reaches_persistent_workers(data, tmp_path):
    dm = make_dm(data, num_workers=2, batch_size=2)
    seen = fit(dm, 3, [PipelineSwitch(switch_epoch=1)], tmp_path)
    assert seen == [(0, 1), (1, 2), (2, 2)]


def test_pipeline_switch_default_epoch_and_resume_in_stage_2(data, tmp_path):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    seen = fit(make_dm(data), 3, [PipelineSwitch(num_last_epochs=1), ckpt], tmp_path)  # switch at 3 - 1
    assert seen == [(0, 1), (1, 1), (2, 2)]
    # a fresh datamodule (stage 1 by default) resumed after epoch 2 of 4 with the switch at 1
    first = fit(make_dm(data), 2, [PipelineSwitch(switch_epoch=1),
                                   L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "c2", save_last=True)],
                tmp_path)
    assert first == [(0, 1), (1, 2)]
    resumed = fit(make_dm(data), 4, [PipelineSwitch(switch_epoch=1)], tmp_path,
                  ckpt_path=str(tmp_path / "c2" / "last.ckpt"))
    assert resumed == [(2, 2), (3, 2)]
