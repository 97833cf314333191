"""Whether a training step fits (pretrain/memory.py): the estimate against hand counts and the
real network, how it scales with the settings, and a run that cannot fit refused in one line
naming the setting, before anything is allocated."""

from __future__ import annotations

import pytest
import torch
from tiny import expect_error, paws_train, tiny_config
from torch import nn

from paws import runtime
from paws.config import load_config
from paws.errors import UserError
from paws.models.networks import Architecture, build_network
from paws.pretrain import memory


class _Block(nn.Module):
    """conv (4 x 6 x 6 out for a 6-pixel image) -> BN (as many) -> in-place ReLU (the same
    tensor) -> linear (3 out), on a list of views as a PAWS model takes them."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu, self.fc = nn.ReLU(inplace=True), nn.Linear(4 * 36, 3)

    def forward(self, views):
        return self.fc(self.relu(self.bn(self.conv(views[0]))).flatten(1))


def test_activations_count_every_layer_output_once():
    with torch.device("meta"):
        block = _Block()
    assert memory._per_image_activations(block, 1, 6) == 4 * 36 + 4 * 36 + 3


def _cfg(*changes: str):
    return load_config(None, ["support.classes=10", "model.width=8", *changes])


def _need(*changes: str) -> memory.StepMemory:
    cfg = _cfg(*changes)
    need = memory.step_memory(cfg, Architecture.from_config(cfg, 1), torch.device("cpu"))
    assert need is not None
    return need


def test_the_estimate_counts_the_real_parameters_and_scales_with_the_step():
    cfg = _cfg()
    real = build_network(Architecture.from_config(cfg, 1), seed=0)
    base = _need()
    assert base.parameter_count == sum(p.numel() for p in real.parameters())
    assert base.parameters == base.parameter_count * 4 * 3  # weights, gradients, momentum
    assert _need("optim.name=adamw").parameters == base.parameter_count * 4 * 4
    more = _need("support.images_per_class=10")  # twice the supports, the same views
    assert more.supports == 2 * base.supports and more.views == base.views
    assert more.support_views == 10 * 10 * 2
    wider = _need("optim.batch_size=256")
    assert wider.views == 2 * base.views and wider.supports == base.supports
    assert _need("views.small_crops=0").views < base.views


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        (["support.images_per_class=100000"], "support.images_per_class 100000"),
        (["optim.batch_size=1000000"], "optim.batch_size 1000000"),
        (["model.proj_hidden=8192", "model.proj_out=8192"], "model.proj_out"),
    ],
)
def test_a_step_that_cannot_fit_names_the_setting_that_takes_the_most(changes, names):
    cfg = _cfg(*changes)
    arch = Architecture.from_config(cfg, 1)
    free = memory.step_memory(cfg, arch, torch.device("cpu")).total - 1
    with pytest.MonkeyPatch.context() as m:
        m.setattr(runtime, "free_memory", lambda device: free)
        with pytest.raises(UserError, match=f"a training step needs at least .*{names}"):
            memory.check_step_fits(cfg, arch, torch.device("cpu"))
        m.setattr(runtime, "free_memory", lambda device: free + 1)
        memory.check_step_fits(cfg, arch, torch.device("cpu"))  # fits exactly
        m.setattr(runtime, "free_memory", lambda device: None)
        memory.check_step_fits(cfg, arch, torch.device("cpu"))  # unknown: not checked


def test_a_network_that_cannot_be_traced_on_meta_is_not_checked(monkeypatch):
    def fails(*args, **kwargs):
        raise RuntimeError("Tensor.item() cannot be called on meta tensors")

    monkeypatch.setattr(memory, "build_network", fails)
    cfg = _cfg()
    assert memory.step_memory(cfg, Architecture.from_config(cfg, 1), torch.device("cpu")) is None


def test_the_cpu_has_a_known_amount_of_free_memory():
    free = runtime.free_memory(torch.device("cpu"))
    assert free is None or free > 0


def test_paws_train_refuses_a_support_batch_beyond_memory_in_one_line(
    folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(runtime, "free_memory", lambda device: 2**30)
    cfg = tiny_config(folder, "support.images_per_class=1000000")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line.startswith("a training step needs at least ")
    assert line.endswith("lower support.images_per_class or support.classes")
    assert not (tmp_path / "run" / "last.pt").exists()
