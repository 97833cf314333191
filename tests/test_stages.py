"""A run before its loop (pretrain/stages.py): ``paws train --init`` starts from another run's
weights, keeps the schedule of the new labels, and refuses another architecture in one line;
the optimiser ``optim.name`` names, and a resume of a run saved before a config key existed."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny import (
    error_line,
    run_cli,
    set_args,
    tiny_overrides,
    train_tiny,
    write_rows,
)

from paws.config import load_config, to_dict
from paws.method.optim import LARS
from paws.models import Architecture
from paws.pretrain.stages import build_optimizer, start_run, training_model
from paws.rundir import checkpoint


def test_init_starts_from_the_previous_run_weights(pool, tmp_path, capsys, monkeypatch):
    first = train_tiny(tmp_path / "r1", tiny_overrides(pool))
    # Learning rates of 0: the new run's parameters never move from where it started.
    still = [
        "optim.start_lr=0",
        "optim.ref_lr=0",
        "optim.final_lr=0",
        "tighten.after_training=false",
    ]
    argv = ["--quiet", "train", "--init", str(first), "--out", str(tmp_path / "r2")]
    code, _, err = run_cli([*argv, *set_args([*tiny_overrides(pool), *still])], capsys, monkeypatch)
    assert code == 0, err
    old = checkpoint.load(first / "last.pt")
    new = checkpoint.load(tmp_path / "r2" / "final.pt")
    params = [k for k, _ in checkpoint_params(new)]
    assert params and all(torch.equal(old["model"][k], new["model"][k]) for k in params)
    assert new["step"] == 4 and not torch.equal(
        old["model"][params[0]], fresh_weights(pool, tmp_path)[params[0]]
    )
    record = json.loads((tmp_path / "r2" / "init.json").read_text())
    assert Path(record["from"]) == first.resolve()
    assert Path(record["checkpoint"]) == (first / "last.pt").resolve()
    assert record["step"] == 4


def checkpoint_params(state: dict) -> list[tuple[str, torch.Tensor]]:
    """The trained parameters of a checkpoint (batch-norm statistics move without a step)."""
    return [
        (k, v) for k, v in state["model"].items() if v.is_floating_point() and "running_" not in k
    ]


def fresh_weights(pool: dict[str, Path], tmp_path: Path) -> dict[str, torch.Tensor]:
    """The weights a run without --init starts from (its seed's initialisation)."""
    from paws.models import Architecture
    from paws.pretrain.stages import training_model

    cfg = load_config(None, tiny_overrides(pool))
    arch = Architecture.from_config(cfg, 1)
    return training_model(cfg, arch, torch.device("cpu")).state_dict()


def test_init_keeps_the_schedule_short_and_takes_new_labels(pool, tmp_path):
    first = train_tiny(tmp_path / "r1", tiny_overrides(pool))
    labels = write_rows(
        tmp_path / "labels.csv", ["path", "label"], [["unl/class0/class0_1.png", "new class"]]
    )
    from paws.pretrain.train import train

    # 2 epochs of 33 images (24 + the 9 labelled) in batches of 8 are 8 steps, not min_steps.
    changes = [
        "optim.steps=null",
        "optim.epochs=2",
        f"data.labels_file={labels}",
        "support.classes=null",
    ]
    cfg = load_config(None, tiny_overrides(pool, *changes))
    result = train(cfg, tmp_path / "r2", init=first)
    assert result["step"] == 8
    saved = load_config(tmp_path / "r2" / "config.yaml")
    assert saved.optim.min_steps is None
    assert saved.data.labels_file == str(labels)


def test_init_of_another_architecture_is_one_line(pool, tmp_path, capsys, monkeypatch):
    first = train_tiny(tmp_path / "r1", tiny_overrides(pool))
    capsys.readouterr()  # the first run's progress
    argv = ["--quiet", "train", "--init", str(first), "--out", str(tmp_path / "r2")]
    overrides = tiny_overrides(pool, "model.proj_out=12")
    code, _, err = run_cli([*argv, *set_args(overrides)], capsys, monkeypatch)
    assert code == 2
    line = error_line(err)
    assert "its architecture differs (proj_out 8 -> 12)" in line, line
    assert not (tmp_path / "r2" / "last.pt").exists()


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
