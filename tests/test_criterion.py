"""RTMDetInsCriterion on a tiny model at small sizes: finiteness, empty batches, chunking, autocast."""

import pytest
import torch

from rtmdet import build_model
from rtmdet.criterion import RTMDetInsCriterion
from rtmdet.model import RawOutputs

from ._targets import ellipse_targets

SIZE = 96
C = 5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny", num_classes=C).train()


def make_targets(counts, seed=0, size=SIZE):
    return ellipse_targets(counts, seed, size, C)


def images(batch=2, seed=1):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def leaves(out: RawOutputs) -> RawOutputs:
    """Detached copies of raw outputs that collect their own gradients."""
    return RawOutputs(*([t.detach().clone().requires_grad_() for t in part] for part in out[:3]),
                      out.mask_protos.detach().clone().requires_grad_())


def grads(out: RawOutputs) -> list[torch.Tensor]:
    return [t.grad for part in out[:3] for t in part] + [out.mask_protos.grad]


def test_losses_are_finite_fp32_scalars_with_finite_gradients(model):
    model.zero_grad()
    losses = model.loss(model(images()), make_targets([4, 1]))
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_mask"}
    for v in losses.values():
        assert v.shape == () and v.dtype == torch.float32 and torch.isfinite(v) and v > 0
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.head.rtm_kernel[0].weight.grad.abs().sum() > 0  # the mask loss reaches the kernels


def test_zero_ground_truth_batch(model):
    out = leaves(model(images()))
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
              "masks": torch.zeros(0, SIZE, SIZE, dtype=torch.bool)}] * 2
    losses = model.loss(out, empty)
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"] > 0  # every prior is a negative
    assert losses["loss_bbox"] == 0 and losses["loss_mask"] == 0
    assert losses["loss_bbox"].requires_grad and losses["loss_mask"].requires_grad
    (losses["loss_bbox"] + losses["loss_mask"]).backward()
    assert all(t.grad is None for t in out.cls_logits)
    for g in grads(out)[3:]:  # box distances, kernels, prototypes: no gradient or an exactly zero one
        assert g is None or (g == 0).all()
    assert out.mask_protos.grad is not None and all(t.grad is not None for t in out.box_dists)


def test_images_without_instances_mix_with_others(model):
    out = model(images())
    mixed = model.loss(out, make_targets([0, 3], seed=2))
    assert all(torch.isfinite(v) for v in mixed.values())


def test_chunked_mask_loss_equals_unchunked(model):
    with torch.no_grad():
        raw = model(images(seed=3))
    targets = make_targets([6, 3], seed=4)
    results = []
    for chunk in (None, 3, 1000):
        out = leaves(raw)
        loss = RTMDetInsCriterion(C, mask_chunk_size=chunk)(out, targets)["loss_mask"]
        loss.backward()
        results.append((loss.detach(), grads(out)))
    (ref_loss, ref_grads), *others = results
    assert ref_loss > 0
    for loss, gs in others:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        for g, r in zip(gs, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-9)
    assert ref_grads[-1].abs().sum() > 0 and ref_grads[6].abs().sum() > 0  # prototypes, kernels of level 0


def test_losses_are_fp32_under_bf16_autocast(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images())
        assert out.cls_logits[0].dtype == torch.bfloat16  # the criterion really gets low-precision inputs
        losses = model.loss(out, make_targets([3, 2]))
    for v in losses.values():
        assert v.dtype == torch.float32 and torch.isfinite(v)
    sum(losses.values()).backward()


def test_ignore_boxes_are_ignored(model):
    with torch.no_grad():
        raw = model(images(seed=5))
        targets = make_targets([3, 2], seed=6)
        plain = model.loss(raw, targets)
        crowd = [dict(t, ignore_boxes=torch.tensor([[0.0, 0.0, 50.0, 50.0]])) for t in targets]
        with_crowd = model.loss(raw, crowd)
    for k in plain:
        assert torch.equal(plain[k], with_crowd[k])


def test_single_process_group_gives_the_same_losses(model, tmp_path):
    import torch.distributed as dist

    with torch.no_grad():
        raw = model(images(seed=7))
        targets = make_targets([4, 2], seed=8)
        alone = model.loss(raw, targets)
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
        try:
            grouped = model.loss(raw, targets)
        finally:
            dist.destroy_process_group()
    for k in alone:
        torch.testing.assert_close(grouped[k], alone[k])


def test_a_few_steps_overfit_a_tiny_batch():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=C).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x, targets = images(batch=1, seed=9), make_targets([3], seed=10)
    history = []
    for _ in range(12):
        loss = sum(model.loss(model(x), targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.8 * history[0], history
