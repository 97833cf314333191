"""Building a pre-training run (:mod:`paws.pretrain.stages`): the optimiser ``optim.name`` names,
and a resume of a run saved before a config key existed."""

from __future__ import annotations

import torch

from paws.config import load_config, to_dict
from paws.method.optim import LARS
from paws.models import Architecture
from paws.pretrain.stages import build_optimizer, start_run, training_model


def _groups(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    return {name: decay[id(p)] for name, p in model.named_parameters()}


def test_adamw_decays_the_weights_but_not_biases_and_norm_parameters():
    cfg = load_config(None, ["optim.name=adamw", "optim.momentum=0.8"])
    model = training_model(cfg, Architecture.from_config(cfg, 1), torch.device("cpu"))
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.999) and group["lr"] == cfg.optim.start_lr
    decay = _groups(optimizer, model)
    norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(decay[f"{n}.weight"] == 0 for n in norms)
    assert all(v == 0 for n, v in decay.items() if n.endswith("bias"))
    convs = [n for n, p in model.named_parameters() if p.ndim == 4]
    assert convs and all(decay[n] == cfg.optim.weight_decay == 0.04 for n in convs)
    # A step moves every parameter that has a gradient.
    x = torch.randn(4, 1, 16, 16)
    model(x)[0].square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    after = [(a, p) for a, p in zip(before, model.parameters()) if p.grad is not None]
    moved = [not torch.equal(a, p) for a, p in after]
    assert moved and all(moved)


def test_lars_stays_the_default_optimiser():
    cfg = load_config(None, [])
    model = training_model(cfg, Architecture.from_config(cfg, 1), torch.device("cpu"))
    assert isinstance(build_optimizer(cfg, model), LARS)


def test_a_run_saved_before_a_key_existed_resumes(tmp_path):
    cfg = load_config(None, [])
    saved = to_dict(cfg)
    del saved["optim"]["name"], saved["model"]["timm_kwargs"]  # as an older paws wrote it
    start_run(cfg, tmp_path / "run", {"config": saved})  # no shape change: no error
    assert (tmp_path / "run" / "config.yaml").is_file()
