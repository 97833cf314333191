"""Encoders, heads and the PAWS model: shapes, sizes, structure, one trunk pass per view size."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from paws.errors import UserError
from paws.models import (
    ENCODERS,
    PAWSModel,
    PredictionHead,
    ProjectionHead,
    create_encoder,
    load_encoder_weights,
)

# Every encoder with 1 and 3 channels; the ResNets with both stems (resnet18 with every
# combination, the larger ones, which share its code, with each stem once).
_CASES = [
    (name, channels, small)
    for name in sorted(ENCODERS)
    for channels in (1, 3)
    for small in ((False, True) if name.startswith("resnet") else (True,))
    if name in ("resnet18",) or not name.startswith("resnet") or small == (channels == 3)
]


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_lists_the_documented_encoders():
    assert set(ENCODERS) >= {"cnn_small", "resnet18", "resnet34", "resnet50", "wide_resnet28_2"}


@pytest.mark.parametrize("name,channels,small", _CASES)
def test_every_encoder_builds_and_runs(name, channels, small):
    torch.manual_seed(0)
    kw = {"width": 4} if name == "cnn_small" else {}
    enc = create_encoder(name, in_channels=channels, small_images=small, **kw)
    side = 16 if small else 32
    out = enc(torch.randn(2, channels, side, side))
    assert out.shape == (2, enc.num_features)
    assert torch.isfinite(out).all()
    if name not in ("resnet34", "resnet50"):  # their blocks are resnet18's; keep the test fast
        out.sum().backward()
        assert all(p.grad is not None for p in enc.parameters())  # no unused layer left over


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_stems(name):
    with torch.device("meta"):
        big = create_encoder(name, in_channels=1, small_images=False)
        small = create_encoder(name, in_channels=3, small_images=True)
    assert big.net.conv1.kernel_size == (7, 7) and big.net.conv1.stride == (2, 2)
    assert big.net.conv1.in_channels == 1 and isinstance(big.net.maxpool, nn.MaxPool2d)
    assert small.net.conv1.kernel_size == (3, 3) and small.net.conv1.stride == (1, 1)
    assert small.net.conv1.in_channels == 3 and isinstance(small.net.maxpool, nn.Identity)
    # The small stem keeps resolution: a 16 px image reaches layer4 at 2 px, not 1/32 of it.
    feats = {}
    small.net.layer4.register_forward_hook(lambda m, i, o: feats.setdefault("x", o))
    small(torch.empty(1, 3, 16, 16, device="meta"))
    assert feats["x"].shape[-2:] == (2, 2)


def test_resnet50_width_1_matches_torchvision_and_width_2_has_four_times_the_params():
    with torch.device("meta"):
        tv = torchvision.models.resnet50()
        w1 = create_encoder("resnet50")
        w2 = create_encoder("resnet50", width=2)
    assert _count(w1) == _count(tv) - _count(tv.fc)  # 23.5M: no fc layer in the trunk
    assert w1.num_features == 2048 and w2.num_features == 4096
    # SimCLR-style widening multiplies every channel count (stem included), so the parameter
    # count grows about width^2: 23.5M, then 94M for SimCLR's ResNet-50 (2x).
    assert 3.9 < _count(w2) / _count(w1) < 4.1
    assert 93e6 < _count(w2) < 95e6
    assert w2.net.conv1.out_channels == 128
    assert w2.net.layer1[0].conv1.out_channels == 128  # bottleneck width 64 * 2
    assert w2.net.layer4[-1].conv3.out_channels == 4096
    # Every stage is consistent (a wrong inplanes would break this forward).
    assert w2(torch.empty(2, 3, 32, 32, device="meta")).shape == (2, 4096)


def test_resnet18_width_multiplier():
    with torch.device("meta"):
        r1, r2 = create_encoder("resnet18"), create_encoder("resnet18", width=2)
    assert r2.num_features == 2 * r1.num_features == 1024
    assert 3.9 < _count(r2) / _count(r1) < 4.1


def test_wide_resnet28_2_size_and_no_dropout():
    enc = create_encoder("wide_resnet28_2")
    # 1.47M parameters (the paper rounds to 1.5M); 128 features.
    assert 1.45e6 < _count(enc) < 1.49e6
    assert enc.num_features == 128
    assert not any(isinstance(m, nn.Dropout) for m in enc.modules())
    blocks = [m for m in enc.modules() if type(m).__name__ == "_WideBlock"]
    assert len(blocks) == 12  # depth 28 = 6 * 4 + 4
    # Pre-activation blocks: batch norm and ReLU come before each convolution.
    assert isinstance(blocks[0].bn1, nn.BatchNorm2d) and blocks[0].bn1.num_features == 16
    assert blocks[0].conv1.out_channels == 32 and blocks[-1].conv2.out_channels == 128
    with pytest.raises(UserError, match="6n\\+4"):
        create_encoder("wide_resnet28_2", depth=27)


def test_unknown_encoder_is_a_user_error_listing_choices():
    with pytest.raises(UserError, match="unknown encoder 'resnet51'.*resnet50"):
        create_encoder("resnet51")


def test_projection_head_has_batch_norm_on_hidden_layers_only():
    head = ProjectionHead(8, 16, 4, layers=3)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Linear,
        nn.BatchNorm1d,
        nn.ReLU,
        nn.Linear,
    ]
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 4)]
    assert head(torch.randn(5, 8)).shape == (5, 4)
    assert head.out_dim == 4
    assert [type(m) for m in ProjectionHead(8, 16, 4, layers=1).mlp] == [nn.Linear]


def test_prediction_head_has_batch_norm_on_input_and_hidden():
    head = PredictionHead(6, 12)
    kinds = [type(m) for m in head.mlp]
    assert kinds == [nn.BatchNorm1d, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head.mlp[0].num_features == 6 and head.mlp[2].num_features == 12
    assert head(torch.randn(5, 6)).shape == (5, 6)


def _model(pred: bool = False) -> PAWSModel:
    torch.manual_seed(0)
    enc = create_encoder("cnn_small", in_channels=1, width=4)
    return PAWSModel(
        enc, ProjectionHead(enc.num_features, 8, 5), PredictionHead(5, 7) if pred else None
    )


def _count_trunk_calls(model: PAWSModel) -> list[int]:
    sizes: list[int] = []
    model.encoder.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
    return sizes


def test_forward_one_trunk_pass_per_run_of_equal_size_views():
    model = _model()
    calls = _count_trunk_calls(model)
    large = [torch.randn(3, 1, 12, 12) for _ in range(2)]
    small = [torch.randn(3, 1, 8, 8) for _ in range(4)]
    h, z = model(large + small)
    assert calls == [6, 12]
    assert h.shape == (18, 5)
    assert z is h  # no prediction head
    calls.clear()
    model([large[0], small[0], large[1]])  # three runs, three passes
    assert calls == [3, 3, 3]


def test_forward_rows_come_back_in_input_order():
    model = _model(pred=True).eval()  # eval: batch norm uses running stats, rows independent
    views = [torch.randn(2, 1, 12, 12), torch.randn(2, 1, 12, 12)]
    views += [torch.randn(2, 1, 8, 8) for _ in range(3)]
    with torch.no_grad():
        h, z = model(views)
        for i, v in enumerate(views):
            hv = model.projection(model.trunk(v))
            assert torch.allclose(h[2 * i : 2 * i + 2], hv, atol=1e-5)
            assert torch.allclose(z[2 * i : 2 * i + 2], model.prediction(hv), atol=1e-5)
    assert not torch.allclose(h, z)


def test_forward_accepts_a_single_tensor_and_embed():
    model = _model(pred=True).eval()
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        h, z = model(x)
        assert torch.equal(model.embed(x), z)
        assert torch.equal(model.embed(x, features="trunk"), model.trunk(x))
    assert model.embed(x, features="trunk").shape == (4, model.encoder.num_features)
    model.channels_last = True
    with torch.no_grad():
        assert torch.allclose(model.trunk(x), model.embed(x, features="trunk"), atol=1e-6)


def test_batch_norm_sees_equal_size_views_as_one_batch():
    # In training mode the two large views are normalised together: encoding them in one call
    # equals one pass over their concatenation, not two separate passes.
    model = _model()
    a, b = torch.randn(4, 1, 12, 12), torch.randn(4, 1, 12, 12)
    h, _ = model([a, b])
    joint = model.projection(model.trunk(torch.cat([a, b])))
    assert torch.allclose(h, joint, atol=1e-5)
    split = torch.cat([model.projection(model.trunk(v)) for v in (a, b)])
    assert not torch.allclose(h, split, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Loading pre-trained weights.


@pytest.fixture(scope="module")
def tv_state() -> dict[str, torch.Tensor]:
    """A torchvision ResNet-18 state dict as saved from DistributedDataParallel: 'module.'
    prefix, 3-channel stem, 1000-way fc layer."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18()
    return {"module." + k: v for k, v in net.state_dict().items()}


def test_load_torchvision_state_dict_with_module_prefix_and_fc(tmp_path, tv_state):
    state = tv_state
    path = tmp_path / "r18.pt"
    torch.save(state, path)
    enc = create_encoder("resnet18", in_channels=3)
    missing, unexpected = load_encoder_weights(enc, path)
    assert missing == [] and unexpected == []
    own = enc.state_dict()
    for k, v in state.items():
        key = k.removeprefix("module.")
        if key.startswith("fc."):
            assert "net." + key not in own
            continue
        assert torch.equal(own["net." + key], v), key


def test_load_sums_rgb_stem_for_grey_input(tmp_path, tv_state):
    state = tv_state
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": state}, path)  # nested as many checkpoints are
    enc = create_encoder("resnet18", in_channels=1)
    missing, unexpected = load_encoder_weights(enc, path)
    assert missing == [] and unexpected == []
    stem = enc.state_dict()["net.conv1.weight"]
    assert stem.shape == (64, 1, 7, 7)
    assert torch.allclose(stem, state["module.conv1.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(
        enc.state_dict()["net.layer1.0.conv1.weight"], state["module.layer1.0.conv1.weight"]
    )


def test_load_safetensors(tmp_path, tv_state):
    from safetensors.torch import save_file

    state = {k.removeprefix("module."): v.contiguous() for k, v in tv_state.items()}
    path = tmp_path / "r18.safetensors"
    save_file(state, str(path))
    enc = create_encoder("resnet18")
    assert load_encoder_weights(enc, path) == ([], [])
    assert torch.equal(enc.state_dict()["net.bn1.weight"], state["bn1.weight"])


def test_load_errors_are_one_line_user_errors(tmp_path, tv_state):
    enc = create_encoder("cnn_small", width=4)
    with pytest.raises(UserError, match="not found"):
        load_encoder_weights(enc, tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read encoder weights"):
        load_encoder_weights(enc, bad)
    other = tmp_path / "other.pt"
    torch.save(tv_state, other)
    with pytest.raises(UserError, match="no tensor .* matches the encoder"):
        load_encoder_weights(enc, other)


def test_architecture_round_trips_and_builds_the_same_network_from_a_seed():
    from paws.config import load_config
    from paws.models import Architecture, Classifier, build_network

    cfg = load_config(None, ["model.width=4", "model.pred_head=true"])
    arch = Architecture.from_config(cfg, 1)
    assert arch.small_images  # 20-pixel views: the small-image stem
    assert Architecture.from_dict(arch.to_dict()) == arch
    state = torch.get_rng_state()
    a, b = build_network(arch, seed=3), build_network(arch, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    other = build_network(arch, seed=4)
    assert not torch.equal(a.encoder.features[0].weight, other.encoder.features[0].weight)
    on_trunk = build_network(arch.with_classifier(5, "trunk"), seed=3)
    on_head = build_network(arch.with_classifier(5, "head"), seed=3)
    assert isinstance(on_trunk, Classifier) and isinstance(on_head, Classifier)
    x = torch.rand(2, 1, 20, 20)
    assert on_trunk(x).shape == on_head(x).shape == (2, 5)
    assert on_trunk.classifier.in_features == 4 * 4 and on_head.classifier.in_features == 256
    with pytest.raises(UserError, match=r"unknown fields \[.wings.\]"):
        Architecture.from_dict({**arch.to_dict(), "wings": 2})


def test_unknown_encoder_suggests_the_nearest_name():
    from paws.models import check_encoder

    with pytest.raises(UserError, match="did you mean 'resnet18'"):
        check_encoder("resnt18")


def test_a_timm_encoder_without_timm_says_how_to_install_it(monkeypatch):
    import sys

    from paws.models import check_encoder

    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    for call in (lambda: check_encoder("timm:resnet18"), lambda: create_encoder("timm:resnet18")):
        with pytest.raises(UserError, match=r"need timm: pip install 'paws-ssl\[timm\]'") as e:
            call()
        assert "\n" not in str(e.value)
    check_encoder("resnet18")  # the built-in encoders need no timm
