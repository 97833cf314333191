"""Config: unknown keys, types, ranges, choices, overrides, round trip, docs, cross-field checks;
the same mistakes and files that are not UTF-8 YAML through the paws command, in one line."""

from __future__ import annotations

import dataclasses
import pickle
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from tiny import (
    Cases,
    copy_run,
    expect_error,
    paws_train,
    tiny_config,
)

from paws.config import (
    Config,
    apply_overrides,
    describe,
    from_dict,
    load_config,
    read_yaml,
    recipe_path,
    save_config,
    to_dict,
)
from paws.errors import UserError


def _error(overrides: list[str]) -> str:
    with pytest.raises(UserError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg == from_dict({}) == Config().validate()


def test_the_fashion_mnist_recipe_is_the_default():
    # `paws train` with no arguments and `--config fashion_mnist` must be the same run.
    assert load_config("fashion_mnist") == load_config()
    recipe = yaml.safe_load(recipe_path("fashion_mnist").read_text())
    assert recipe["optim"]["ref_lr"] == load_config().optim.ref_lr


def test_unknown_section_suggests_the_closest():
    assert _error(["optm.ref_lr=1"]) == "unknown config key 'optm'; did you mean 'optim'?"


def test_unknown_nested_key_suggests_the_closest():
    assert (
        _error(["optim.ref_l=1"])
        == "unknown config key 'optim.ref_l'; did you mean 'optim.ref_lr'?"
    )
    assert "did you mean 'support.images_per_class'" in _error(["support.image_per_class=3"])


def test_unknown_key_without_close_match_lists_valid_keys():
    msg = _error(["loss.zzzzzz=1"])
    assert "unknown config key 'loss.zzzzzz'" in msg
    assert "valid keys: tau, sharpen, me_max" in msg


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("views:\n  large_sise: 32\n")
    with pytest.raises(UserError, match="'views.large_sise'; did you mean 'views.large_size'"):
        load_config(path)


def test_wrong_types():
    assert _error(["optim.batch_size=abc"]) == "optim.batch_size must be int, got 'abc'"
    assert _error(["model.proj_hidden=2.5"]) == "model.proj_hidden must be int, got 2.5"
    assert _error(["views.flip=3"]) == "views.flip must be bool, got 3"
    assert _error(["optim.start_lr=true"]) == "optim.start_lr must be float, got True"
    assert "views.large_scale must be list of float" in _error(["views.large_scale=0.5"])
    assert "views.large_scale[1] must be float" in _error(["views.large_scale=[0.5, x]"])
    assert _error(["data.root=[1]"]) == "data.root must be str or null, got [1]"
    assert "optim.momentum must be a finite number" in _error(["optim.momentum=.nan"])
    assert _error(["optim=3"]) == "config section 'optim' must be a mapping of keys, got '3'"


@pytest.mark.parametrize("value", ["false", "[]", "0", "''", "[a]"])
@pytest.mark.parametrize("section", ["optim", "data", "model"])
def test_a_section_of_another_kind_is_refused_not_read_as_the_defaults(section, value, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"{section}: {value}\n")
    with pytest.raises(UserError, match=f"config section '{section}' must be a mapping of keys"):
        load_config(path)
    with pytest.raises(UserError, match=f"the config's '{section}' is .*, not a section of keys"):
        load_config(path, [f"{section}.seed=1"])
    path.write_text(f"{section}:\n")  # an empty section is the defaults
    assert load_config(path) == Config()


def test_gentle_conversions():
    cfg = load_config(None, ["optim.ref_lr=2", "optim.batch_size=64.0", "views.ratio=[1, 2]"])
    assert cfg.optim.ref_lr == 2.0 and isinstance(cfg.optim.ref_lr, float)
    assert cfg.optim.batch_size == 64 and isinstance(cfg.optim.batch_size, int)
    assert cfg.views.ratio == [1.0, 2.0]
    cfg = from_dict({"views": {"large_scale": (0.2, 0.9)}})
    assert cfg.views.large_scale == [0.2, 0.9]


def test_out_of_range():
    assert _error(["optim.batch_size=0"]) == "optim.batch_size must be in [1, 1048576], got 0"
    assert _error(["optim.momentum=1.5"]) == "optim.momentum must be in [0.0, 0.9999], got 1.5"
    assert _error(["support.views=9"]) == "support.views must be in [1, 8], got 9"
    assert _error(["optim.ref_lr=-1"]) == "optim.ref_lr must be >= 0.0, got -1.0"
    # Absurd counts are refused at once, not run for ever.
    assert _error(["optim.steps=1e30"]) == "optim.steps must be in [1, 100000000], got 1e+30"
    assert _error(["optim.epochs=1e30"]) == "optim.epochs must be in [0.0, 1000000.0], got 1e+30"
    assert _error(["tighten.steps=1e9"]) == (
        "tighten.steps must be in [1, 100000000], got 1000000000"
    )
    # Bounds are inclusive.
    assert load_config(None, ["support.views=8", "optim.momentum=0"]).support.views == 8


def test_literal_choices_with_suggestion():
    assert (
        _error(["run.device=cuda1"])
        == "run.device must be one of auto, cpu, cuda; got 'cuda1' (did you mean 'cuda'?)"
    )
    msg = _error(["data.dataset=cifar"])
    assert "data.dataset must be one of fashion_mnist, cifar10, cifar100, imagenet, folder" in msg
    assert "did you mean 'cifar10'?" in msg
    assert "did you mean" not in _error(["eval.features=zzz"])


def test_choices_that_yaml_1_1_would_read_as_booleans():
    # PyYAML's defaults read off/no/yes as booleans; these are choices, and must stay strings.
    cfg = load_config(None, ["run.amp=off", "data.in_memory=no"])
    assert cfg.run.amp == "off" and cfg.data.in_memory is False
    assert load_config(None, ["data.in_memory=yes"]).data.in_memory is True
    assert load_config(None, ["data.in_memory=auto"]).data.in_memory == "auto"
    # Switches still accept the YAML 1.1 spellings.
    assert load_config(None, ["views.flip=off"]).views.flip is False
    assert load_config(None, ["views.flip=no", "model.pred_head=yes"]).model.pred_head is True
    assert "views.flip must be bool, got 'maybe'" in _error(["views.flip=maybe"])


def test_yaml_file_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "optim:\n  weight_decay: 1e-5\n  final_lr: 0\nrun:\n  amp: off\nviews:\n  flip: false\n"
    )
    cfg = load_config(path)
    assert cfg.optim.weight_decay == pytest.approx(1e-5)
    assert cfg.optim.final_lr == 0.0 and cfg.run.amp == "off" and cfg.views.flip is False


def test_overrides_parse_yaml_values():
    cfg = load_config(
        None,
        [
            "optim.weight_decay=1e-5",
            "optim.ref_lr=0.5",
            "optim.steps=7",
            "views.large_scale=[0.2, 1]",
            "data.labels_per_class=null",
            "data.label_fraction=0.1",
            "views.flip=false",
            "model.pred_head=true",
            "finetune.lrs=[0.1]",
            "data.root=some/dir",
            "run.channels_last=",
        ],
    )
    assert cfg.optim.weight_decay == pytest.approx(1e-5)
    assert cfg.optim.ref_lr == 0.5 and cfg.optim.steps == 7
    assert cfg.views.large_scale == [0.2, 1.0]
    assert cfg.data.labels_per_class is None and cfg.data.label_fraction == 0.1
    assert cfg.views.flip is False and cfg.model.pred_head is True
    assert cfg.finetune.lrs == [0.1]
    assert cfg.data.root == str(Path.cwd() / "some" / "dir")  # as the run records it
    assert cfg.run.channels_last is None  # an empty value is null


def test_overrides_later_wins_and_input_is_not_modified():
    base = {"optim": {"ref_lr": 1.0, "start_lr": 0.1}}
    out = apply_overrides(base, ["optim.ref_lr=2", "optim.ref_lr=3"])
    assert out == {"optim": {"ref_lr": 3, "start_lr": 0.1}}
    assert base == {"optim": {"ref_lr": 1.0, "start_lr": 0.1}}


def test_override_without_equals_sign():
    assert _error(["optim.ref_lr"]) == "--set expects key=value, got 'optim.ref_lr'"


def test_save_and_load_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "optim.weight_decay=1e-5",
            "run.amp=off",
            "data.in_memory=no",
            "views.small_crops=0",
            "data.mean=[0.5]",
            "data.std=[0.25]",
            "model.pred_head=true",
        ],
    )
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)
    # The file is plain YAML any reader understands, with every section.
    plain = yaml.safe_load(path.read_text())
    assert set(plain) == {f.name for f in dataclasses.fields(Config)}


def test_recipe_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("")
    assert recipe_path(str(path)) == path
    assert load_config(path) == Config()
    with pytest.raises(UserError, match="config file not found: no_such_recipe"):
        recipe_path("no_such_recipe")


def test_bad_yaml_files_are_one_line_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: [1, 2\n")
    with pytest.raises(UserError, match="cannot parse") as e:
        load_config(path)
    assert "\n" not in str(e.value)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(path)


def test_describe_lists_every_key_with_its_doc():
    text = describe()
    lines = text.splitlines()
    for section in dataclasses.fields(Config):
        assert f"{section.name}:" in lines
        for f in dataclasses.fields(section.default_factory):
            doc = f.metadata.get("doc", "")
            assert doc.strip(), f"{section.name}.{f.name} has no doc"
            matching = [line for line in lines if line.startswith(f"  {f.name} (")]
            assert any(line.endswith(doc) for line in matching), f"{section.name}.{f.name}"
    assert "  ref_lr (float, default 2.26): " in text
    assert "  device ('auto' | 'cpu' | 'cuda', default 'auto'): compute device" in text


def test_cross_field_validation():
    # labelled-subset keys have a precedence instead of conflicting
    assert load_config(None, ["data.label_fraction=0.1"]).data.label_fraction == 0.1
    assert "data.labeled is not set" in _error(["data.dataset=folder"])
    ok = load_config(None, ["data.dataset=folder", "data.labeled=some/dir"])
    assert ok.data.labeled == str(Path.cwd() / "some" / "dir")
    assert (
        _error(["views.large_scale=[0.5, 0.2]"])
        == "views.large_scale must be [low, high] with 0 < low <= high <= 1, got [0.5, 0.2]"
    )
    assert "views.small_scale must be" in _error(["views.small_scale=[0.1, 1.5]"])
    assert "views.ratio must be [low, high] with 0 < low <= high, got" in _error(
        ["views.ratio=[0, 1]"]
    )
    assert load_config(None, ["views.ratio=[0.5, 3]"]).views.ratio == [0.5, 3.0]
    assert _error(["data.mean=[0.1, 0.2]"]) == "data.mean needs 1 or 3 values, got 2"
    assert "finetune.lrs and finetune.epochs must not be empty" in _error(["finetune.lrs=[]"])


def test_every_field_has_a_default_and_a_doc():
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            assert (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            )
            assert f.metadata.get("doc"), f"{section.name}.{f.name}"


def test_switching_encoder_keeps_its_standard_width():
    # model.width defaults to each architecture's own width, so naming another encoder does not
    # carry the small CNN's 32 channels over as a 32x ResNet.
    from paws.models import Architecture, build_network

    def build_encoder(cfg, channels):
        return build_network(Architecture.from_config(cfg, channels)).encoder

    assert load_config().model.width == 0
    assert build_encoder(load_config(), 1).num_features == 4 * 32
    resnet = build_encoder(load_config(None, ["model.encoder=resnet18"]), 3)
    assert resnet.num_features == 512
    assert build_encoder(load_config(None, ["model.width=8"]), 1).num_features == 32


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("optim", "bach_size", 6, "unknown config key 'optim.bach_size'; did you mean "
         "'optim.batch_size'?"),
        ("optim", "steps", "ten", "optim.steps must be int or null, got 'ten'"),
        ("optim", "momentum", 2, "optim.momentum must be in [0.0, 0.9999], got 2.0"),
        ("data", "on_bad_image", "skipp", "data.on_bad_image must be one of error, skip; got "
         "'skipp' (did you mean 'skip'?)"),
        ("optim", "ref_lr", float("nan"), "optim.ref_lr must be a finite number, got nan"),
    ],
)  # fmt: skip
def test_bad_config_value(section, key, value, message, folder, tmp_path, capsys, monkeypatch):
    cfg = tiny_config(folder)
    cfg[section][key] = value
    assert expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg)) == message


def test_misspelt_section_and_override(folder, tmp_path, capsys, monkeypatch):
    cfg = tiny_config(folder)
    cfg["optm"] = cfg.pop("optim")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line == "unknown config key 'optm'; did you mean 'optim'?"
    line = expect_error(
        paws_train(tmp_path, capsys, monkeypatch, tiny_config(folder), "--set", "run.sed=1")
    )
    assert line == "unknown config key 'run.sed'; did you mean 'run.seed'?"


def test_values_as_users_write_them_in_yaml(tmp_path):
    # YAML 1.1 reads `no` and `off` as booleans and 1e-4 as a string.
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "data:\n  in_memory: no\noptim:\n  weight_decay: 1e-4\n  steps: 2e3\nrun:\n  amp: off\n"
    )
    cfg = load_config(path)
    assert cfg.data.in_memory is False and cfg.run.amp == "off"
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.steps == 2000
    assert load_config(None, ["data.in_memory=yes", "optim.ref_lr=3e-1"]).optim.ref_lr == 0.3


def _encodings(text: str) -> Iterator[tuple[str, bytes]]:
    accented = "# r\u00e9sum\u00e9: the first run\n" + text
    yield "UTF-16 with a BOM", text.encode("utf-16")
    yield "UTF-16-LE", text.encode("utf-16-le")
    yield "UTF-16-BE", text.encode("utf-16-be")
    yield "UTF-32", text.encode("utf-32")
    yield "latin-1", accented.encode("latin-1")
    yield "cp1252", accented.encode("cp1252")
    yield "random bytes", np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    yield "a NUL byte", text.encode()[:40] + b"\x00" + text.encode()[40:]
    yield "gzip", zlib.compress(text.encode())
    yield "a pickle", pickle.dumps({"optim": {"steps": 2}})


def test_configs_that_are_not_utf8_yaml(made, tmp_path, capsys):
    cases = Cases(capsys)
    text = made["config"].read_text()
    for i, (name, data) in enumerate(_encodings(text)):
        path = tmp_path / f"cfg{i}.yaml"
        path.write_bytes(data)
        out = tmp_path / f"run{i}"
        cases.refused(f"train: {name}", ["train", "--config", str(path), "--out", str(out)], path)
        assert not out.exists(), name
        cases.refused(f"config: {name}", ["config", "--config", str(path)], path)
        run = copy_run(made, tmp_path / f"resume{i}")
        (run / "config.yaml").write_bytes(data)
        cases.refused(f"resume: {name}", ["train", "--resume", str(run)], run)
    cases.check()


def _laughs(levels: int = 9) -> str:
    """YAML whose aliases of aliases expand to 9**levels values ("billion laughs")."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim:\n  steps: 3\n  steps: 4\n", "the key 'steps' is written twice (lines 2 and 3)"),
        ("optim:\n  steps: 3\nrun: {}\noptim:\n  ref_lr: 1\n", "the key 'optim' is written twice"),
        ("optim:\n  steps: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than 50 deep"),
        (_laughs() + "\noptim:\n  steps: *l8\n", "expand to more than 100,000 values"),
        ("optim:\n  steps: &a [1, *a]\n", "an alias refers to a value that holds it"),
    ],
    ids=["duplicate key", "duplicate section", "deep", "billion laughs", "recursive"],
)
def test_yaml_a_config_cannot_hold_is_one_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        load_config(path)
    assert str(e.value).startswith(f"cannot parse {path}: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_set_values_have_the_same_bounds_and_merge_keys_still_work(tmp_path):
    with pytest.raises(UserError, match=r"^--set finetune.lrs: .*expand to more than"):
        apply_overrides({}, ["finetune.lrs=" + "{" + _laughs().replace("\n", ", ") + "}"])
    with pytest.raises(UserError, match=r"^--set data.labeled: nested more than 50 deep"):
        apply_overrides({}, ["data.labeled=" + "[" * 3000 + "]" * 3000])
    path = tmp_path / "merge.yaml"
    path.write_text("base: &b {steps: 3, ref_lr: 0.5}\noptim:\n  <<: *b\n  steps: 5\n")
    values = read_yaml(path)
    assert values["optim"] == {"steps": 5, "ref_lr": 0.5}


def test_tightening_with_one_image_per_class_is_refused_before_a_nan_loss():
    # With one image of each class in a batch, no image has another of its class: SuNCEt's
    # mean over no scored rows would be NaN, and the model saved from it.
    assert "tighten.images_per_class must be in [2, 1000000], got 1" in _error(
        ["tighten.images_per_class=1"]
    )
    assert load_config(None, ["tighten.images_per_class=2"]).tighten.images_per_class == 2


def test_a_std_of_zero_or_less_and_zero_epochs_are_refused():
    assert "data.std must be > 0 for every channel" in _error(["data.std=[0.2, 0, 0.2]"])
    assert "data.std must be > 0" in _error(["data.std=[-0.5]"])
    assert "optim.epochs is 0: the run would take no step" in _error(["optim.epochs=0"])
    assert load_config(None, ["optim.epochs=0", "optim.steps=3"]).optim.steps == 3
