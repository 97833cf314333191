"""timm backbones (``model.encoder: timm:<name>``): the tested families, a ViT at two crop sizes,
weights from a local timm file, tiny runs that train, evaluate, export and load back, and the
user errors. No weights are downloaded: every model is built with ``pretrained=False``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from tiny import error_line, run_cli, set_args, tiny_overrides, train_tiny, write_folder

import paws
from paws import rundir
from paws.config import load_config
from paws.errors import UserError
from paws.models import Architecture, build_network, check_encoder, create_encoder
from paws.pretrain.stages import training_model

timm = pytest.importorskip("timm")

# timm's own small test models of the ResNet and ViT families train in about a second; a 4 px
# patch and a 12 px position-embedding grid fit the 12 px large and 8 px small crops of TINY.
CNN = ["model.encoder=timm:test_resnet", "model.width=0", "tighten.after_training=false"]
VIT = [
    "model.encoder=timm:test_vit",
    "model.width=0",
    "model.patch_size=4",
    "model.img_size=12",
    "tighten.after_training=false",
]


@pytest.mark.parametrize(
    "name,options,features",
    [
        ("resnet18", {}, 512),
        ("convnext_atto", {}, 320),
        ("vit_tiny_patch16_224", {"patch_size": 8, "img_size": 32}, 192),
    ],
)
def test_tested_families_take_grey_images_and_give_pooled_features(name, options, features):
    torch.manual_seed(0)
    enc = create_encoder(f"timm:{name}", in_channels=1, **options)
    timm_model = enc.model
    assert enc.num_features == timm_model.num_features == features  # the model's own size
    assert isinstance(timm_model.get_classifier(), nn.Identity)  # num_classes=0: no classifier
    stem = timm_model.get_submodule(timm_model.pretrained_cfg["first_conv"])
    assert stem.in_channels == 1  # grey input through timm's in_chans
    sizes = (32, 16) if "vit" in name else (32,)
    for side in sizes:  # a ViT also takes another size: its dynamic image size
        out = enc(torch.randn(2, 1, side, side))
        assert out.shape == (2, enc.num_features) and torch.isfinite(out).all()


def test_a_vit_encodes_large_and_small_crops_with_the_options_recorded():
    cfg = load_config(None, [*VIT, "views.large_size=12", "views.small_size=8"])
    arch = Architecture.from_config(cfg, 1)
    assert arch.encoder_kwargs == {"patch_size": 4, "img_size": 12} and not arch.small_images
    model = build_network(Architecture.from_dict(json.loads(json.dumps(arch.to_dict()))), seed=0)
    vit = model.encoder.model
    assert tuple(vit.patch_embed.grid_size) == (3, 3) and vit.pos_embed.shape[1] == 1 + 9
    tokens: list[int] = []
    vit.blocks[0].register_forward_hook(lambda m, i, o: tokens.append(o.shape[1]))
    large, small = torch.randn(3, 1, 12, 12), torch.randn(5, 1, 8, 8)
    h, z = model([large, large, small, small])
    # One trunk pass per crop size: 1 + 3x3 tokens, then 1 + 2x2 (interpolated positions).
    assert tokens == [10, 5]
    assert h.shape == (16, cfg.model.proj_out) and z is h
    with pytest.raises(UserError, match="not a multiple of the ViT patch size 4"):
        model([torch.randn(2, 1, 10, 10)])


@pytest.mark.parametrize("channels", [1, 3])
def test_a_timm_cnn_trains_and_classifies_by_paws_nn(tmp_path, channels):
    images = {"per_class": 6, "size": 14, "channels": channels}
    folders = {
        "labeled": write_folder(tmp_path / "labeled", **images, seed=1),
        "test": write_folder(tmp_path / "test", per_class=4, size=14, channels=channels, seed=2),
    }
    run = train_tiny(tmp_path / "run", tiny_overrides(folders, *CNN))
    summary = json.loads((run / "eval.json").read_text())
    assert summary["num_query"] == 12 and 0 <= summary["top1"] <= 100
    # The run's record rebuilds the trained network: its predictions are the run's.
    model = paws.load(run, device="cpu")
    assert model.architecture.in_channels == channels
    files = sorted(folders["test"].rglob("*.png"))
    saved = json.loads((run / "predictions.json").read_text())
    got = [saved["classes"].index(top[0][0]) for top in model.predict(files, top_k=1)]
    assert got == saved["predictions"]


def test_a_vit_run_trains_exports_and_loads_back_the_same_network(
    tmp_path, labeled_and_test, capsys, monkeypatch
):
    run = train_tiny(tmp_path / "run", tiny_overrides(labeled_and_test, *VIT))
    restored = rundir.restore(run)
    assert restored.arch.encoder == "timm:test_vit"
    assert restored.arch.encoder_kwargs == {"patch_size": 4, "img_size": 12}
    files = sorted(labeled_and_test["test"].rglob("*.png"))
    loaded = paws.load(run, device="cpu")
    saved = json.loads((run / "predictions.json").read_text())
    got = [saved["classes"].index(top[0][0]) for top in loaded.predict(files, top_k=1)]
    assert got == saved["predictions"]  # the network that training evaluated
    code, _, err = run_cli(
        ["--quiet", "export", str(run), "--out", str(tmp_path / "exp")], capsys, monkeypatch
    )
    assert code == 0, err
    exported = paws.load(tmp_path / "exp", device="cpu")
    assert torch.allclose(exported.embed(files), loaded.embed(files), atol=1e-5)
    # A resume may not change the patch size: the saved weights would not fit.
    code, _, err = run_cli(
        ["--quiet", "train", "--resume", str(run), "--set", "model.patch_size=2"],
        capsys,
        monkeypatch,
    )
    assert code == 2 and "model.patch_size (4 -> 2)" in error_line(err)


# --------------------------------------------------------------------------------------------
# Weights from a local timm checkpoint file (model.weights).


def test_a_timm_state_dict_file_initialises_the_trunk_with_a_grey_stem(tmp_path):
    torch.manual_seed(1)
    source = timm.create_model("convnext_atto", pretrained=False)  # 3 channels, 1000 classes
    saved = source.state_dict()
    path = tmp_path / "convnext_atto.pth"
    torch.save(saved, path)
    cfg = load_config(None, ["model.encoder=timm:convnext_atto", f"model.weights={path}"])
    model = training_model(cfg, Architecture.from_config(cfg, 1), torch.device("cpu"))
    trunk = model.encoder.model.state_dict()
    assert set(saved) - set(trunk) == {"head.fc.weight", "head.fc.bias"}  # the classifier only
    for k, v in trunk.items():
        if k == "stem.0.weight":  # RGB filters summed for grey input
            assert v.shape[1] == 1 and torch.allclose(v, saved[k].sum(dim=1, keepdim=True))
        else:
            assert torch.equal(v, saved[k]), k
    assert torch.equal(trunk["head.norm.weight"], saved["head.norm.weight"])  # trunk, not head


def test_a_vit_file_fits_another_image_size_by_resampling_positions(tmp_path):
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(2)
    source = timm.create_model("test_vit", pretrained=False)  # 160 px, patch 16: a 10x10 grid
    saved = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / "test_vit.safetensors"
    save_file({"module." + k: v for k, v in saved.items()}, str(path))
    arch = Architecture("timm:test_vit", {"img_size": 32}, in_channels=3)
    trunk = build_network(arch, seed=0, weights=path).encoder.model.state_dict()
    expected = resample_abs_pos_embed(saved["pos_embed"], (2, 2), num_prefix_tokens=1)
    assert trunk["pos_embed"].shape == (1, 5, 64)
    assert torch.allclose(trunk["pos_embed"], expected, atol=1e-6)
    for k in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"):
        assert torch.equal(trunk[k], saved[k]), k


# --------------------------------------------------------------------------------------------
# User errors.


def test_an_unknown_timm_name_suggests_the_nearest(capsys, monkeypatch):
    with pytest.raises(UserError, match="did you mean timm:resnet18"):
        check_encoder("timm:resnt18")
    args = ["config", "--set", "model.encoder=timm:vit_smal_patch16_224"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    line = error_line(err)
    assert code == 2 and "unknown timm model 'vit_smal_patch16_224'" in line
    assert "did you mean timm:vit_small_patch16_224" in line


def test_keys_that_do_not_apply_to_the_encoder_are_one_line_errors(tmp_path, capsys, monkeypatch):
    cases = {
        "model.patch_size applies to timm encoders only": ["model.patch_size=4"],
        "model.width applies to the built-in encoders": [*CNN, "model.width=4"],
        "model.small_images applies to the built-in": [*CNN, "model.small_images=true"],
    }
    for message, settings in cases.items():
        with pytest.raises(UserError, match=message):
            load_config(None, settings)
    with pytest.raises(UserError, match="model.img_size does not apply to timm:test_resnet"):
        create_encoder("timm:test_resnet", img_size=32)
    # A crop size that is no multiple of the patch size stops training with one line.
    folder = write_folder(tmp_path / "labeled", per_class=4, size=12)
    settings = tiny_overrides({"labeled": folder}, *VIT, "views.small_size=6")
    code, _, err = run_cli(
        ["--quiet", "train", *set_args(settings), "--out", str(tmp_path / "run")],
        capsys,
        monkeypatch,
    )
    assert code == 2
    assert "6x6 is not a multiple of the ViT patch size 4" in error_line(err)


def test_global_batch_norm_refuses_batch_norms_that_hold_an_activation():
    from paws.distributed import check_plain_batchnorm

    check_plain_batchnorm(create_encoder("timm:test_resnet"))  # plain BatchNorm2d layers
    with pytest.raises(UserError, match="run.sync_bn cannot make BatchNormAct2d layers global"):
        check_plain_batchnorm(create_encoder("timm:test_efficientnet"))


def test_the_vit_small_recipe_builds_a_vit_s16_that_takes_its_crops():
    cfg = load_config("imagenet_vit_small_16")
    arch = Architecture.from_config(cfg, 3)
    assert arch.encoder == "timm:vit_small_patch16_224" and arch.encoder_kwargs == {}
    v = cfg.views
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        net = build_network(arch)
        large = [torch.empty(2, 3, v.large_size, v.large_size)] * 2
        small = [torch.empty(2, 3, v.small_size, v.small_size)] * v.small_crops
        h, _ = net(large + small)  # 224 and 96 px crops are multiples of the 16 px patch
    assert h.shape == (2 * (2 + v.small_crops), 256)
    assert net.encoder.num_features == 384  # ViT-S width
    assert 21e6 < sum(p.numel() for p in net.encoder.parameters()) < 23e6  # ViT-S: 22M
