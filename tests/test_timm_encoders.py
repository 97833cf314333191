"""timm families as paws trunks (:mod:`paws.models.timm_encoders`): the trunk's output size from
the model itself, ``model.timm_kwargs``, and one PAWS step of each family with LARS and AdamW.
Every model is built with ``pretrained=False``; nothing is downloaded."""

from __future__ import annotations

import pytest
import torch

from paws.config import load_config
from paws.data.loaders import Batch
from paws.errors import UserError
from paws.method.losses import smooth_labels
from paws.models import Architecture, create_encoder
from paws.models.timm_encoders import TimmEncoder, output_size
from paws.pretrain.stages import build_optimizer, training_model
from paws.pretrain.step import train_step

timm = pytest.importorskip("timm")

# The smallest model of each family, as the config names it, with the settings that make it
# take 32 px large and 16 px small crops (a ViT's patch and grid, a Swin's window) and keep it
# small on a CPU. The families marked * return head_hidden_size, not num_features, features.
VIT_32 = ["model.patch_size=8", "model.img_size=32", "model.timm_kwargs.depth=2"]
FAMILIES = {
    "resnet10t": [],
    "regnetx_002": [],
    "mobilenetv3_small_050": [],  # *
    "efficientnet_b0": [],
    "convnext_atto": ["views.small_size=32"],  # its 2 px downsampling convs need 32 px
    "ghostnet_050": [],  # *
    "lcnet_050": [],  # *
    "efficientvit_b0": [],  # *
    "hgnetv2_b0": [],  # *
    "vit_tiny_patch16_224": VIT_32,
    "deit_tiny_patch16_224": VIT_32,
    "swin_tiny_patch4_window7_224": [
        "model.img_size=32",
        "model.timm_kwargs={window_size: 2, depths: [1, 1, 1, 1], embed_dim: 16, "
        "num_heads: [1, 1, 1, 1], strict_img_size: false}",
    ],
}


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: these small convolutions run many times slower when two threads wait
    on each other on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_step(name: str, settings: list[str], optimizer: str) -> None:
    """One PAWS step of ``timm:<name>`` on grey 32 and 16 px crops: the trunk's features are
    the size it says, every view gets an embedding, the loss is finite and the weights move."""
    cfg = load_config(
        None,
        [
            f"model.encoder=timm:{name}",
            "model.width=0",
            "views.large_size=32",
            "views.small_size=16",
            f"optim.name={optimizer}",
            "run.sync_bn=false",
            *settings,
        ],
    )
    arch = Architecture.from_config(cfg, 1)
    model = training_model(cfg, arch, torch.device("cpu"))
    trunk = model.encoder
    with torch.no_grad():
        features = trunk(torch.randn(2, 1, 32, 32))
    assert features.shape == (2, trunk.num_features)
    optim = build_optimizer(cfg, model)
    torch.manual_seed(0)
    supports = torch.randn(6, 1, 32, 32)  # 3 classes x 2 images
    small = cfg.views.small_size
    views = [torch.randn(4, 1, 32, 32)] * 2 + [torch.randn(4, 1, small, small)] * 2
    labels = smooth_labels(torch.arange(3).repeat_interleave(2), 3)
    with torch.no_grad():
        h, z = model([supports, *views])
    assert h.shape == z.shape == (6 + 16, cfg.model.proj_out)
    before = [p.detach().clone() for p in trunk.parameters()]
    result = train_step(model, optim, Batch(0, views, supports), labels, cfg.loss)
    assert torch.isfinite(result.loss)
    moved = sum(not torch.equal(a, p) for a, p in zip(before, trunk.parameters()))
    assert moved > len(before) // 2  # the step reached the trunk


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_each_family_trains_a_step_on_its_own_output_size(name):
    if not timm.is_model(name):
        pytest.skip(f"this timm has no {name}")
    _tiny_step(name, FAMILIES[name], "lars")


def test_a_vit_trains_a_step_with_adamw():
    _tiny_step("vit_tiny_patch16_224", FAMILIES["vit_tiny_patch16_224"], "adamw")


def test_head_hidden_size_is_the_output_size_and_a_probe_measures_it_where_timm_has_none():
    trunk = create_encoder("timm:mobilenetv3_small_050", in_channels=1)
    model = trunk.model
    # With num_classes=0 MobileNetV3 keeps its 1024-wide head convolution after the 288
    # channels timm calls num_features: the projection head must take 1024.
    assert model.num_features != trunk.num_features == model.head_hidden_size
    del model.head_hidden_size  # as in a timm without the attribute
    bn = model.bn1 if hasattr(model, "bn1") else None
    stats = None if bn is None else bn.running_mean.clone()
    model.train()
    assert output_size(model, 1) == trunk.num_features  # one forward pass measures it
    assert model.training  # left as it was, running statistics untouched
    if stats is not None:
        assert torch.equal(stats, bn.running_mean)
    assert TimmEncoder(model, 1).num_features == trunk.num_features


def test_timm_kwargs_reach_timm_and_bad_ones_are_one_line_errors():
    vit = create_encoder("timm:test_vit", drop_path_rate=0.25)
    rates = [b.drop_path1.drop_prob for b in vit.model.blocks if hasattr(b.drop_path1, "drop_prob")]
    assert rates and max(rates) == pytest.approx(0.25)
    cfg = load_config(None, ["model.encoder=timm:test_vit", "model.timm_kwargs.drop_path_rate=0.1"])
    assert Architecture.from_config(cfg, 3).encoder_kwargs == {"drop_path_rate": 0.1}
    with pytest.raises(UserError, match=r"^model.timm_kwargs.no_such_option does not apply"):
        create_encoder("timm:test_resnet", no_such_option=1)
    with pytest.raises(UserError, match=r"^timm cannot build timm:test_vit with global_pool="):
        create_encoder("timm:test_vit", global_pool="nonsense")
    with pytest.raises(UserError, match="not pooled"):  # an unpooled trunk, said in a line
        create_encoder("timm:test_resnet", global_pool="")(torch.randn(2, 3, 32, 32))
    with pytest.raises(UserError, match="without pretrained"):  # a crafted record
        Architecture.from_dict({"encoder": "timm:test_vit", "encoder_kwargs": {"pretrained": True}})
