"""Config sections (:mod:`paws.config.schema`): ``optim.name: adamw`` and its defaults,
``model.timm_kwargs`` and its one-line errors."""

from __future__ import annotations

import pytest
import yaml
from tiny import error_line, run_cli

from paws.config import ADAMW_DEFAULTS, describe, from_dict, load_config, to_dict
from paws.errors import UserError


def test_adamw_takes_its_own_defaults_where_the_config_leaves_them_unset():
    lars = load_config(None, []).optim
    adamw = load_config(None, ["optim.name=adamw"]).optim
    assert adamw.name == "adamw" and lars.name == "lars"
    for key, value in ADAMW_DEFAULTS.items():
        assert getattr(adamw, key) == value != getattr(lars, key)
    assert adamw.batch_size == lars.batch_size  # the other keys as they were
    kept = load_config(None, ["optim.name=adamw", "optim.ref_lr=0.002"]).optim
    assert kept.ref_lr == 0.002 and kept.start_lr == ADAMW_DEFAULTS["start_lr"]
    # The resolved config holds the values: read back, it is the same run.
    cfg = load_config(None, ["optim.name=adamw"])
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)
    assert "adamw" in describe() and "ref_lr 0.0005" in describe()


def test_timm_kwargs_are_plain_values_for_timm_encoders_only(capsys, monkeypatch):
    cfg = load_config(None, ["model.encoder=timm:test_vit", "model.timm_kwargs.depth=2"])
    assert cfg.model.timm_kwargs == {"depth": 2}
    assert yaml.safe_load(yaml.safe_dump(to_dict(cfg)))["model"]["timm_kwargs"] == {"depth": 2}
    assert load_config(None, []).model.timm_kwargs == {}
    cases = {
        "model.timm_kwargs applies to timm encoders only": ["model.timm_kwargs.depth=2"],
        "model.timm_kwargs.pretrained: paws sets it itself; weights never come from the hub": [
            "model.timm_kwargs.pretrained=true"
        ],
        "model.timm_kwargs.in_chans: paws sets it itself": ["model.timm_kwargs.in_chans=3"],
        "model.timm_kwargs.patch_size: paws sets it itself; set model.patch_size": [
            "model.timm_kwargs.patch_size=4"
        ],
        "model.timm_kwargs.act: must be a number, word": ["model.timm_kwargs={act: {a: 1}}"],
        "model.timm_kwargs must be a mapping": ["model.timm_kwargs=[1, 2]"],
    }
    for message, settings in cases.items():
        if "applies to" not in message:
            settings = ["model.encoder=timm:test_vit", *settings]
        code, _, err = run_cli(["config", *[f"--set={s}" for s in settings]], capsys, monkeypatch)
        assert code == 2 and error_line(err).startswith(message), (message, err)
    with pytest.raises(UserError, match="is not a keyword argument name"):
        from_dict({"model": {"encoder": "timm:test_vit", "timm_kwargs": {"not a name": 1}}})
