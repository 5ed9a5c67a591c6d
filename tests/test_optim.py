"""The official optimiser's parameter groups (rtmdet/optim.py)."""

import torch

from rtmdet import build_model
from rtmdet.optim import build_optimizer, param_groups


def test_no_decay_on_norms_and_biases_every_parameter_once():
    model = build_model("tiny", num_classes=3)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() == 4 for p in decay["params"])  # conv weights only (the head's are 1x1 / 3x3 convs)
    undecayed = [names[id(p)] for p in no_decay["params"]]
    assert all(n.endswith("bias") or ".bn." in n or "norm" in n for n in undecayed), undecayed
    assert any("cls_norms" in n for n in undecayed) and any(n.endswith("rtm_cls.0.bias") for n in undecayed)


def test_build_optimizer_is_adamw_with_the_official_settings():
    model = build_model("tiny", num_classes=3)
    opt = build_optimizer(model, lr=0.004, weight_decay=0.05)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 0.004 and opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    # one step moves the weights like plain AdamW (the fused kernel is the same update)
    ref = build_model("tiny", num_classes=3)
    ref.load_state_dict(model.state_dict())
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.05), lr=0.004, foreach=False)
    for m, o in ((model, opt), (ref, ref_opt)):
        x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        sum(t.float().square().mean() for t in m(x)[0]).backward()
        o.step()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
