"""The export format (apply/export.py): safetensors weights and a JSON description that stand
alone, and every damaged part refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import JSON_WRONG, Cases, error_line, weight_damage

import paws
from paws.after.finetune import finetune_checkpoint
from paws.apply.export import MANIFEST, is_export, read_export, write_export
from paws.apply.load import from_checkpoint
from paws.cli import main

_FRESH = textwrap.dedent(
    """
    import sys, numpy as np, paws
    folder, images = sys.argv[1], sys.argv[2:]
    for name in ("pre", "fine"):
        model = paws.load(f"{folder}/{name}", device="cpu")
        np.savez(f"{folder}/{name}.npz", probs=model.predict_proba(images).numpy(),
                 head=model.embed(images, features="head").numpy(),
                 trunk=model.embed(images, features="trunk").numpy(),
                 classes=np.array(model.classes))
    """
)


@pytest.mark.slow
def test_export_reproduces_the_model_in_a_fresh_process(shared_run, tmp_path):
    paths, run_dir = shared_run
    # Copy the run so that it can disappear before the export is loaded.
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    finetune_checkpoint(copy, ["finetune.lrs=[0.05]", "finetune.epochs=[2]"], copy)
    files = [str(f) for f in sorted(paths["test_all"].rglob("*.png"))]
    expected = {}
    for name, ckpt in (("pre", copy / "last.pt"), ("fine", copy / "finetune.pt")):
        model = from_checkpoint(ckpt, device="cpu")
        expected[name] = {
            "probs": model.predict_proba(files).numpy(),
            "head": model.embed(files, "head").numpy(),
            "trunk": model.embed(files, "trunk").numpy(),
            "classes": model.classes,
        }
        assert main(["--quiet", "export", str(ckpt), "--out", str(tmp_path / name)]) == 0
    shutil.rmtree(copy)  # no checkpoint, no config.yaml: the export must stand alone
    manifest = json.loads((tmp_path / "pre" / "model.json").read_text())
    assert manifest["classify"]["method"] == "snn" and manifest["classify"]["num_support"] == 32
    assert manifest["preprocessing"]["size"] == 16 and manifest["preprocessing"]["channels"] == 1
    fine = json.loads((tmp_path / "fine" / "model.json").read_text())["classify"]
    # a classifier's support serves its known score only
    assert fine["method"] == "linear" and fine["num_support"] == 32 and "known" in fine
    assert (tmp_path / "fine" / "support.safetensors").is_file()
    # The fresh process imports this same paws, from any working directory.
    src = str(Path(paws.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, "-c", _FRESH, str(tmp_path), *files], check=True, cwd=tmp_path, env=env
    )
    for name in ("pre", "fine"):
        got = np.load(tmp_path / f"{name}.npz")
        assert list(got["classes"]) == expected[name]["classes"]
        for key in ("probs", "head", "trunk"):
            assert got[key].shape == expected[name][key].shape
            assert np.abs(got[key] - expected[name][key]).max() < 1e-5, (name, key)


MANIFEST_VALID = {
    "batch_size": {"int"},
    "preprocessing.size": {"int"},
    "classify.tau": {"int", "float"},
    "classify.chunk_size": {"int"},
    "classify.known": {"none"},
    "classify.known.tau": {"int", "float"},
    "classify.known.alpha": {"int", "float"},
    "classify.known.threshold": {"int", "float"},
    "classify.known.neighbours": {"int"},
    "classify.known.nodes": {"int"},
}


# Entries an old export may lack (they take defaults); any other removed must be refused.
MANIFEST_OPTIONAL = {"kind", "batch_size", "version", "classify.tau", "classify.chunk_size"}


MANIFEST_OPTIONAL |= {"classify.known", "classify.features", "classify.support"}


MANIFEST_OPTIONAL |= {"classify.num_support"} | {f"classify.known.{k}" for k in ("kind", "tau")}


MANIFEST_OPTIONAL |= {"classify.known.features", "classify.known.quantile"}
MANIFEST_OPTIONAL |= {f"classify.known.{k}" for k in ("neighbours", "nodes", "alpha")}
MANIFEST_OPTIONAL |= {"sha256"}  # exports written before checksums were recorded
MANIFEST_OPTIONAL |= {"source"}  # exports of no run's own checkpoint
MANIFEST_VALID.update({"source.size": {"int"}, "source.mtime_ns": {"int"}})
MANIFEST_VALID["sha256"] = {"none"}


def _entries(m: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, list[str]]]:
    """Dotted names and paths of every entry of the description, sections' entries included
    (the architecture's are the model's and have their own checks)."""
    for key, value in m.items():
        yield prefix + key, [*prefix.split(".")[:-1], key] if prefix else [key]
        if isinstance(value, dict) and key != "architecture" and key != "encoder_kwargs":
            yield from _entries(value, f"{prefix}{key}.")


def _set(m: dict[str, Any], path: list[str], value: Any, remove: bool = False) -> dict:
    out = json.loads(json.dumps(m))
    node = out
    for p in path[:-1]:
        node = node[p]
    if remove:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


def test_every_export_description_entry_of_a_wrong_kind_or_missing(made, tmp_path, capsys):
    cases = Cases(capsys)
    manifest = json.loads((made["export"] / "model.json").read_text())
    entries = list(_entries(manifest))
    assert {"classify.known.quantile", "preprocessing.mean", "batch_size"} <= dict(entries).keys()
    variants = []
    for name, path in entries:
        for kind, value in JSON_WRONG.items():
            if kind not in MANIFEST_VALID.get(name, ()):
                variants.append((f"{name}={kind}", _set(manifest, path, value)))
        if name not in MANIFEST_OPTIONAL:
            variants.append((f"without {name}", _set(manifest, path, None, remove=True)))
    for i, (name, bad) in enumerate(variants):
        export = Path(shutil.copytree(made["export"], tmp_path / f"e{i}"))
        (export / "model.json").write_text(json.dumps(bad))
        cases.refused(name, ["predict", str(export), str(made["image"])], export)
    cases.check()
    assert cases.count > 80


def _manifest_values(m: dict[str, Any]) -> Iterator[tuple[str, dict]]:
    """Values of the right kind that are still wrong."""
    for size in (0, -1, 10**9):
        yield f"batch_size {size}", _set(m, ["batch_size"], size)
    for size in (0, 2, 100_000):
        yield f"image size {size}", _set(m, ["preprocessing", "size"], size)
    yield "fewer classes than labels", _set(m, ["classes"], m["classes"][:2])
    yield "no classes", _set(m, ["classes"], [])
    yield "twice a class", _set(m, ["classes"], [m["classes"][0]] * len(m["classes"]))
    yield "mean of 2 channels", _set(m, ["preprocessing", "mean"], [0.5, 0.5])
    yield "std 0", _set(m, ["preprocessing", "std"], [0.0, 0.2, 0.2])
    yield "one channel", _set(m, ["preprocessing", "channels"], 1)
    yield "support outside", _set(m, ["classify", "support"], "../model.safetensors")
    yield "newer version", _set(m, ["version"], 99)
    yield "a linear model of snn supports", _set(m, ["classify", "method"], "linear")
    yield "proj_out 10**9", _set(m, ["architecture", "proj_out"], 10**9)
    yield "unknown encoder", _set(m, ["architecture", "encoder"], "resnet5000")


def _support_values(s: dict[str, torch.Tensor]) -> Iterator[tuple[str, dict]]:
    emb, labels = s["embeddings"], s["labels"]
    yield "embeddings one wider", {**s, "embeddings": torch.cat([emb, emb[:, :1]], 1)}
    yield "empty supports", {**s, "embeddings": emb[:0], "labels": labels[:0]}
    yield (
        "a label out of range",
        {**s, "labels": labels.clone().index_fill_(0, torch.tensor([0]), 3)},
    )
    yield "a negative label", {**s, "labels": labels.clone().index_fill_(0, torch.tensor([0]), -1)}
    yield "float labels", {**s, "labels": labels.float()}
    yield "fewer labels", {**s, "labels": labels[:-1]}
    yield "NaN embeddings", {**s, "embeddings": torch.full_like(emb, float("nan"))}
    yield "1-D embeddings", {**s, "embeddings": emb.flatten()}
    yield "no embeddings", {k: v for k, v in s.items() if k != "embeddings"}
    yield "no labels", {k: v for k, v in s.items() if k != "labels"}
    if "known" in s:
        yield "known one row short", {**s, "known": s["known"][:-1]}
        yield "known one wider", {**s, "known": torch.cat([s["known"], s["known"][:, :1]], 1)}


def test_export_values_and_support_tensors_that_do_not_fit(made, tmp_path, capsys):
    cases = Cases(capsys)
    manifest = json.loads((made["export"] / "model.json").read_text())
    support = load_file(str(made["export"] / "support.safetensors"))
    weights = load_file(str(made["export"] / "model.safetensors"))
    for i, (name, bad) in enumerate(_manifest_values(manifest)):
        export = Path(shutil.copytree(made["export"], tmp_path / f"m{i}"))
        (export / "model.json").write_text(json.dumps(bad))
        cases.refused(name, ["predict", str(export), str(made["image"])], export)
    tensors = [("support.safetensors", n, t) for n, t in _support_values(support)]
    tensors += [("model.safetensors", n, w) for n, w in weight_damage(weights) if "not a" not in n]
    for i, (file, name, bad) in enumerate(tensors):
        export = Path(shutil.copytree(made["export"], tmp_path / f"s{i}"))
        save_file({k: v.contiguous() for k, v in bad.items()}, str(export / file))
        cases.refused(
            f"{file}: {name}",
            ["embed", str(export), str(made["image"]), "--out", str(tmp_path / f"s{i}.npy")],
            export,
        )
        assert not (tmp_path / f"s{i}.npy").exists()
    cases.check()


def test_an_export_read_back_and_written_again_is_the_same_export(made, tmp_path):
    assert is_export(made["export"]) and not is_export(made["run"])
    first = read_export(made["export"])
    # The model the run directory means: pre-trained or tightened, soft nearest neighbours.
    assert first.kind in ("pretrain", "tighten") and first.classify["method"] == "snn"
    again = write_export(first, tmp_path / "again")
    assert json.loads((again / MANIFEST).read_text()) == json.loads(
        (made["export"] / MANIFEST).read_text()
    )
    second = read_export(again)
    assert (second.kind, second.classes, second.batch_size) == (
        first.kind,
        first.classes,
        first.batch_size,
    )
    assert second.architecture == first.architecture
    assert second.preprocessing == first.preprocessing
    for parts in ("weights", "support"):
        a, b = getattr(first, parts), getattr(second, parts)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), parts


def test_a_support_of_other_dtypes_is_stored_as_float32_embeddings_and_int64_labels(made, tmp_path):
    export = read_export(made["export"])
    support = export.support
    export.support = {
        **support,
        "embeddings": support["embeddings"].double(),
        "labels": support["labels"].int(),
    }
    back = read_export(write_export(export, tmp_path / "cast")).support
    assert back["embeddings"].dtype == torch.float32 and back["labels"].dtype == torch.int64
    assert torch.equal(back["labels"], support["labels"])
    assert torch.equal(back["embeddings"], support["embeddings"].float())


def test_an_export_mixed_with_another_or_stopped_part_way_is_refused(
    shared_run, tmp_path, capsys, monkeypatch
):
    import paws.apply.export as export_module

    paths, run_dir = shared_run
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["--quiet", "export", str(run_dir), "--out", str(a)]) == 0
    argv = ["--quiet", "export", str(run_dir), "--support", str(paths["support"])]
    assert main([*argv, "--out", str(b)]) == 0
    paws.load(a)  # whole: opens
    shutil.copy(b / "support.safetensors", a / "support.safetensors")  # files of two exports
    capsys.readouterr()
    assert main(["predict", str(a), str(paths["test"])]) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"{a} is not a whole export: support.safetensors is not the file")

    def killed(path, data):  # the process dies once the weights are written
        if path.name == "support.safetensors":
            raise KeyboardInterrupt
        export_module.write_atomic(path, data)
        return "x"

    monkeypatch.setattr(export_module, "_write_summed", killed)
    assert main(["--quiet", *argv, "--out", str(a)]) != 0  # stopped as by Ctrl-C
    assert not (a / "model.json").exists()  # no description of a half-written export
