"""``--model.compile``: the LightningModule compiles its network in place (checkpoints unchanged)."""

import pytest
import torch

from rtmdet.lightning_module import RTMDetInsModule


def test_compile_option_is_in_place_and_keeps_state_dict_keys():
    plain = RTMDetInsModule(size="tiny", num_classes=3)
    compiled = RTMDetInsModule(size="tiny", num_classes=3, compile=True)
    assert compiled.hparams.compile is True
    assert plain.model._compiled_call_impl is None
    assert compiled.model._compiled_call_impl is not None  # nn.Module.compile: compiled lazily on the first call
    assert list(compiled.state_dict()) == list(plain.state_dict())  # no "_orig_mod." prefixes


@pytest.mark.slow
def test_compiled_forward_and_training_step_match_eager():
    torch.manual_seed(0)
    module = RTMDetInsModule(size="tiny", num_classes=3, compile=True)
    eager = RTMDetInsModule(size="tiny", num_classes=3)
    eager.load_state_dict(module.state_dict())
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 4:30, 4:40] = True
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1]), "masks": mask}] * 2
    for m in (module, eager):
        m.train()
        loss = sum(m.model.loss(m(x), targets).values())
        loss.backward()
        m.eval()
    assert torch.allclose(sum(module.model.loss(module(x), targets).values()),
                          sum(eager.model.loss(eager(x), targets).values()), atol=1e-4)
    g1 = module.model.head.rtm_cls[0].bias.grad
    g2 = eager.model.head.rtm_cls[0].bias.grad
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
