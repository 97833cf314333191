"""Fine-tuning (Appendix A) and SuNCEt tightening (Appendix C) on a tiny pre-trained run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from tiny import error_line, write_folder

from paws.after.finetune import crop_flip_views, finetune_checkpoint, validation_split
from paws.after.tighten import freeze_batchnorm, interpolate_weights, tighten_checkpoint
from paws.apply.load import from_checkpoint
from paws.cli import main
from paws.config import load_config
from paws.data import load_datasets
from paws.errors import UserError
from paws.method.losses import supervised_nce
from paws.models import Classifier
from paws.rundir import checkpoint, restore_model

SWEEP = [
    "finetune.lrs=[0.005,0.05,0.5]",
    "finetune.epochs=[2,4]",
    "finetune.batch_size=8",
    "finetune.val_fraction=0.25",
]


def test_validation_split_holds_out_each_class_and_keeps_singletons():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1)
    train, val = validation_split(labels, 0.2, seed=3)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(16))
    assert not set(train) & set(val)
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    again, _ = validation_split(labels, 0.2, seed=3)
    assert np.array_equal(train, again)


def test_crop_flip_views_switch_off_colour_only():
    views = crop_flip_views(load_config().views)
    assert (views.color_strength, views.color_prob, views.gray_prob, views.blur_prob) == (
        0,
        0,
        0,
        0,
    )
    assert views.flip and views.large_scale == load_config().views.large_scale


def test_classifier_sits_on_first_head_layer_and_starts_at_zero(shared_run):
    _, run_dir = shared_run
    _, model, _ = restore_model(run_dir)
    clf = Classifier.from_pretrained(model, 4)
    assert list(dict(clf.head.named_children())) == ["fc1", "bn1", "relu1"]
    assert clf.encoder is model.encoder and clf.classifier.in_features == 32
    assert torch.count_nonzero(clf.classifier.weight) == 0
    clf.eval()
    x = torch.randn(3, 1, 16, 16)
    assert torch.allclose(clf(x).softmax(1), torch.full((3, 4), 0.25))
    assert clf.embed(x, "trunk").shape == (3, 24)
    on_meta = Classifier.from_pretrained(model.to("meta"), 4)  # another device
    assert on_meta.classifier.weight.device.type == "meta"


def test_finetune_selects_on_validation_never_on_test(shared_run, tmp_path):
    paths, run_dir = shared_run
    cfg, _, _ = restore_model(run_dir, SWEEP)
    data = load_datasets(cfg)
    report = finetune_checkpoint(run_dir, SWEEP, tmp_path / "a", data=data)
    vals = [row["val_top1"] for row in report["sweep"]]
    assert len(vals) == 6 and report["num_val"] == 8 and report["num_train"] == 24
    best = int(np.argmax(vals))
    assert (report["lr"], report["epochs"]) == (
        report["sweep"][best]["lr"],
        report["sweep"][best]["epochs"],
    )
    assert report["val_top1"] == max(vals)
    assert len(set(vals)) > 1, "the sweep should tell the settings apart"
    # A different test set (other images, shuffled labels) changes nothing in the selection.
    rng = np.random.default_rng(0)
    other_test = data.test.subset(rng.permutation(len(data.test))[:20])
    other_test.labels = rng.permutation(other_test.labels)
    report2 = finetune_checkpoint(
        run_dir, SWEEP, tmp_path / "b", data=dataclasses.replace(data, test=other_test)
    )
    assert report2["sweep"] == report["sweep"]
    assert (report2["lr"], report2["epochs"]) == (report["lr"], report["epochs"])
    assert report2["test"]["num_query"] == 20 != report["test"]["num_query"]
    # The saved classifier predicts the reported test accuracy.
    saved = checkpoint.load(tmp_path / "a" / "finetune.pt")
    assert saved["kind"] == "finetune" and saved["finetune"]["lr"] == report["lr"]
    predictor = from_checkpoint(tmp_path / "a" / "finetune.pt", device="cpu")
    files = sorted((paths["test"]).rglob("*.png"))
    top = predictor.predict(files)
    acc = 100 * np.mean([t[0][0] == f.parent.name for f, t in zip(files, top)])
    assert acc == pytest.approx(report["test"]["top1"], abs=1e-4)
    written = json.loads((tmp_path / "a" / "finetune.json").read_text())
    assert written["sweep"] == report["sweep"]


def test_single_setting_needs_no_validation(shared_run, tmp_path):
    _, run_dir = shared_run
    overrides = ["finetune.lrs=[0.05]", "finetune.epochs=[2]", "finetune.val_fraction=0"]
    report = finetune_checkpoint(run_dir, overrides, tmp_path)
    assert report["sweep"] == [] and report["num_val"] == 0 and report["num_train"] == 32
    assert report["paws_nn"] is not None and report["test"]["num_query"] == 48


def test_sweep_without_validation_is_a_user_error(shared_run, tmp_path):
    _, run_dir = shared_run
    with pytest.raises(UserError, match="val_fraction"):
        finetune_checkpoint(run_dir, ["finetune.val_fraction=0"], tmp_path)


def test_a_fine_tuned_checkpoint_is_evaluated_as_a_classifier_and_not_tightened(
    shared_run, tmp_path, capsys
):
    _, run_dir = shared_run
    r = finetune_checkpoint(run_dir, ["finetune.lrs=[0.05]", "finetune.epochs=[1]"], tmp_path)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "finetune.pt"), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["features"] == "classifier" and ev["top1"] == pytest.approx(r["test"]["top1"])
    assert main(["tighten", str(tmp_path / "finetune.pt")]) == 2
    assert "fine-tuned classifier" in error_line(capsys.readouterr().err)


def test_freeze_batchnorm_keeps_layers_in_eval_mode_without_gradients():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.BatchNorm1d(8))
    net.train()
    frozen = freeze_batchnorm(net)
    assert len(frozen) == 2 and all(not m.training for m in frozen)
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert net[0].weight.requires_grad


def _bn_state(state: dict) -> dict:
    model = state["model"]
    names = {k.rsplit(".", 1)[0] for k in model if k.endswith("running_mean")}
    return {k: v for k, v in model.items() if k.rsplit(".", 1)[0] in names}


def test_tighten_freezes_batchnorm_and_trains_the_rest(shared_run, tmp_path, capsys, monkeypatch):
    paths, run_dir = shared_run
    overrides = ["tighten.steps=20", "tighten.classes=4"]
    report = tighten_checkpoint(run_dir, overrides, tmp_path)
    assert "largest labelled class has 8 images: using 8 per class" in capsys.readouterr().err
    before, after = checkpoint.load(run_dir / "last.pt"), checkpoint.load(tmp_path / "tighten.pt")
    assert after["kind"] == "tighten" and report["images_per_class"] == 8
    bn_before, bn_after = _bn_state(before), _bn_state(after)
    assert bn_before and bn_before.keys() == bn_after.keys()
    for k in bn_before:
        assert torch.equal(bn_before[k], bn_after[k]), k
    changed = [
        k
        for k, v in before["model"].items()
        if k not in bn_before and not torch.equal(v, after["model"][k])
    ]
    assert any(k.startswith("encoder.") for k in changed)
    assert any(k.startswith("projection.") for k in changed)
    # The labelled clusters are tighter: SuNCEt over the whole labelled set went down.
    cfg, _, _ = restore_model(run_dir)
    data = load_datasets(cfg)
    labels = torch.nn.functional.one_hot(torch.from_numpy(data.labeled.labels), 4).float()
    losses = []
    for ckpt in (run_dir, tmp_path / "tighten.pt"):
        emb = from_checkpoint(ckpt, device="cpu").embed(sorted(paths["labeled"].rglob("*.png")))
        losses.append(float(supervised_nce(emb, labels, 0.1)))
    assert losses[1] < losses[0]
    assert report["paws_nn_after"]["num_query"] == 48
    # paws eval reads the tightened checkpoint like a pre-trained one.
    assert main(["--quiet", "eval", str(tmp_path / "tighten.pt")]) == 0


def test_interpolate_weights_moves_floats_between_the_ends_and_keeps_counts():
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[4.0, -2.0]]))
        model[1].running_mean.fill_(3.0)
    model[1].num_batches_tracked.fill_(7)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 2.0]]))
        model[1].running_mean.fill_(1.0)
    model[1].num_batches_tracked.fill_(9)
    interpolate_weights(model, start, 0.25)  # 0.75 x start + 0.25 x now
    assert torch.allclose(model[0].weight, torch.tensor([[3.0, -1.0]]))
    assert torch.allclose(model[1].running_mean, torch.tensor([2.5]))
    assert int(model[1].num_batches_tracked) == 9
    interpolate_weights(model, start, 1.0)  # nothing moves
    assert torch.allclose(model[0].weight, torch.tensor([[3.0, -1.0]]))
    interpolate_weights(model, start, 0.0)  # back at the start
    assert torch.allclose(model[0].weight, start["0.weight"])


def test_the_tightened_model_is_halfway_between_pre_training_and_suncet(shared_run, tmp_path):
    _, run_dir = shared_run
    steps = ["tighten.steps=5", "tighten.classes=4"]
    tighten_checkpoint(run_dir, [*steps, "tighten.interpolate=1"], tmp_path / "suncet")
    report = tighten_checkpoint(run_dir, steps, tmp_path / "half")  # the default, 0.5
    assert report["interpolate"] == 0.5
    before = checkpoint.load(run_dir / "last.pt")["model"]
    suncet = checkpoint.load(tmp_path / "suncet" / "tighten.pt")["model"]
    half = checkpoint.load(tmp_path / "half" / "tighten.pt")["model"]
    moved = [k for k in before if not torch.equal(before[k], suncet[k])]
    assert moved
    for k in before:
        if before[k].is_floating_point():
            assert torch.allclose(half[k], (before[k] + suncet[k]) / 2, atol=1e-6), k


def test_tighten_copes_with_classes_of_one_image_and_needs_one_class_of_two(shared_run, tmp_path):
    paths, run_dir = shared_run
    single = write_folder(tmp_path / "single", [0, 1], 1, size=16, seed=9)
    with pytest.raises(UserError, match="every class has 1"):
        tighten_checkpoint(
            run_dir,
            [f"data.labeled={single}", "data.test=null", "tighten.steps=1"],
            tmp_path,
        )
    # Two images of class 0, one of each other class: tightening runs and the lone images
    # only serve as neighbours.
    uneven = write_folder(tmp_path / "uneven", [0], 2, size=16, seed=3)
    write_folder(uneven, [1, 2, 3], 1, size=16, seed=4)
    report = tighten_checkpoint(
        run_dir,
        [f"data.labeled={uneven}", f"data.test={paths['test']}", "tighten.steps=2"],
        tmp_path / "t",
    )
    assert report["images_per_class"] == 2 and report["steps"] == 2
    assert np.isfinite(report["loss_first"]) and report["paws_nn_after"]["num_query"] == 48
