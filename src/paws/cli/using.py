"""``paws eval``, ``predict``, ``embed``, ``export``, ``config`` and ``report``: the commands that
apply, describe and draw a trained model."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from paws.cli.base import (
    _checkpoint_overrides,
    _config_args,
    _data_folders,
    _load,
    _model_args,
    _open_model,
    _print_json,
    _set_option,
    command,
)
from paws.errors import UserError
from paws.files import check_not_input, check_out_dir, check_out_file, write_atomic


@command("eval", "test accuracy of a model (PAWS-NN against the labelled images, or a classifier)")
def _eval_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    _set_option(p, "override a config key, e.g. --set data.root=/data/fmnist (repeatable)")
    p.add_argument("--features", choices=["head", "trunk"], help="embedding to classify")
    p.add_argument(
        "--unknown",
        metavar="DIR",
        help="images of classes outside the support (any layout): also report how well the "
        "known score tells them from the test images (AUROC, FPR at 95%% TPR)",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    def run(args: argparse.Namespace) -> int:
        import numpy as np

        from paws import runtime
        from paws.after.evaluate import classifier_accuracy, paws_nn, unknown_detection
        from paws.data import ImageSet, load_datasets, scan_images
        from paws.rundir import checkpoint, restore

        overrides = list(args.overrides)
        if args.features:
            overrides.append(f"eval.features={args.features}")
        restored = restore(args.checkpoint, overrides)
        cfg, model, state = restored.cfg, restored.net, restored.state
        device = runtime.setup(cfg)
        data = load_datasets(cfg)
        if data.test is None:
            raise UserError("no test set to evaluate: set data.test to a <class>/<image> folder")
        model.to(device)
        if state.get("kind") in checkpoint.CLASSIFIERS:  # its own classes, as predict does
            ev = classifier_accuracy(model, data, cfg, device)
            ev.update(num_support=0, features="classifier")
        else:
            ev = paws_nn(model, data, cfg, device, progress=True)
        keys = ("top1", "top5", "balanced_top1", "num_support", "num_query", "features")
        out = {k: ev[k] for k in keys}
        if args.unknown:
            files = scan_images(args.unknown)
            names = [str(f) for f in files]
            images = ImageSet(labels=np.full(len(files), -1), names=names, files=files)
            out["unknown"] = unknown_detection(model, data, cfg, device, images, progress=True)
        if args.json:
            _print_json(out)
            return 0
        how = (
            f"{state.get('kind')} classifier"
            if out["features"] == "classifier"
            else f"PAWS-NN, {out['num_support']} supports, {out['features']} features"
        )
        print(
            f"top-1 {out['top1']:.2f}%  top-5 {out['top5']:.2f}%  balanced top-1 "
            f"{out['balanced_top1']:.2f}%  ({out['num_query']} queries, {how})"
        )
        if args.unknown:
            u = out["unknown"]
            print(
                f"unknown images: AUROC {u['auroc']:.3f}, FPR at 95% TPR "
                f"{100 * u['fpr_at_95_tpr']:.1f}%; the calibrated threshold ({u['threshold']:.3f}) "
                f"flags {u['unknown_flagged']:.1f}% of the {u['num_unknown']} unknown and "
                f"{u['known_flagged']:.1f}% of the {u['num_known']} test images"
            )
        return 0

    return run


def _say_skipped(skipped: list[tuple[int, str]]) -> None:
    """One line for the unreadable files a command left out (``data.on_bad_image: skip``)."""
    from paws.progress import info

    if skipped:
        info(
            f"skipped {len(skipped)} unreadable images (data.on_bad_image: skip), e.g. "
            f"{skipped[0][1]}"
        )


def _unread(files: list[Path], sources: list[str | int]) -> list[tuple[int, str]]:
    """The files absent from ``sources`` (the answers' files, in input order)."""
    out, k = [], 0
    for i, f in enumerate(files):
        if k < len(sources) and sources[k] == str(f):
            k += 1
        else:
            out.append((i, str(f)))
    return out


@command("predict", "classify images: top-k classes with probabilities, as CSV or JSON")
def _predict_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    _model_args(p)
    p.add_argument(
        "--support",
        metavar="DIR",
        help="pre-trained models: classify against this <class>/<image> folder (any classes, "
        "also ones unseen in pre-training); default: the run's labelled images",
    )
    p.add_argument("--top-k", type=int, default=1, metavar="K", help="classes per image")
    p.add_argument("--format", choices=["csv", "json"], help="default: from --out, else csv")
    p.add_argument("--out", metavar="FILE", help="write here instead of standard output")

    def run(args: argparse.Namespace) -> int:
        from paws.apply.outputs import predictions_text
        from paws.data.images import expand_images
        from paws.progress import info

        if args.top_k < 1:
            raise UserError("--top-k must be at least 1")
        if args.out:
            check_out_file(args.out)
        fmt = args.format or ("json" if (args.out or "").endswith(".json") else "csv")
        files = expand_images(args.images)
        if args.out:
            data = _data_folders(args.checkpoint, args.overrides)
            check_not_input(args.out, files, [*data, args.support])
        model = _open_model(args)
        if args.support:
            model.set_support(args.support, progress=True)
        model.ready(progress=True)
        info(f"classifying {len(files)} images with the {model.summary}")
        predictions = model.predictions(files, top_k=args.top_k, progress=True)
        _say_skipped(_unread(files, [p.source for p in predictions]))
        threshold = model.unknown_threshold
        if threshold is not None:
            flagged = sum(p.unknown for p in predictions)
            info(
                f"{flagged} of {len(predictions)} images are unknown: known score below "
                f"{threshold:.3f} (eval.unknown_quantile "
                f"{model.known_score.quantile:g} of the labelled images' own scores)"
            )
        text = predictions_text([str(p.source) for p in predictions], predictions, fmt)
        if args.out:
            write_atomic(args.out, text)
            info(f"predictions written to {args.out}")
        else:
            sys.stdout.write(text)
        return 0

    return run


@command("embed", "embeddings of images (.npy with a file list, or .safetensors)")
def _embed_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    _model_args(p)
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="FILE.npy (file list in FILE.txt) or FILE.safetensors (file list in its metadata)",
    )
    p.add_argument(
        "--features",
        choices=["head", "trunk"],
        default="head",
        help="head: the space PAWS-NN classifies in (fine-tuned: the classifier's input); "
        "trunk: the encoder output",
    )

    def run(args: argparse.Namespace) -> int:
        from paws.apply.outputs import (
            EMBEDDING_SUFFIXES,
            check_embedding_names,
            write_embeddings,
        )
        from paws.data.images import expand_images
        from paws.progress import info

        if Path(args.out).suffix not in EMBEDDING_SUFFIXES:
            raise UserError(f"--out must end in .npy or .safetensors, got {Path(args.out).name}")
        check_out_file(args.out)
        files = expand_images(args.images)
        check_embedding_names(args.out, files)  # before the work, not after it
        data = _data_folders(args.checkpoint, args.overrides)
        for written in (Path(args.out), Path(args.out).with_suffix(".txt")):
            check_not_input(
                written, files, data, "--out" if written.suffix != ".txt" else "the list"
            )
        model = _open_model(args)
        e = model.embedded(files, [args.features], progress=True)
        _say_skipped(e.skipped)
        emb = e.features[args.features]
        where = write_embeddings(args.out, emb, [files[i] for i in e.positions], args.features)
        info(f"{emb.shape[0]} embeddings of size {emb.shape[1]} ({args.features}) in {where}")
        return 0

    return run


@command("export", "write a model for paws.load() (safetensors + JSON) or for ONNX Runtime")
def _export_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("checkpoint", help="checkpoint file or run directory")
    p.add_argument(
        "--format",
        choices=["safetensors", "onnx"],
        default="safetensors",
        help="safetensors: weights + JSON that paws.load() reads without config; onnx: "
        "model.onnx (images to class probabilities and embeddings), encoder.onnx and onnx.json, "
        "for ONNX Runtime without paws (needs paws-ssl[onnx])",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        help="export folder (default: export-<checkpoint name> next to the checkpoint, "
        "or export inside a run directory; -onnx appended for --format onnx)",
    )
    p.add_argument(
        "--support",
        metavar="DIR",
        help="pre-trained models: classify against this <class>/<image> folder instead of "
        "the run's labelled images",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="compute device (auto: CUDA when available)",
    )
    _checkpoint_overrides(p, "data.root=DIR")

    def run(args: argparse.Namespace) -> int:
        from paws.apply.load import from_checkpoint

        src = Path(args.checkpoint)
        suffix = "-onnx" if args.format == "onnx" else ""
        if args.out:
            out = Path(args.out)
        elif src.is_dir():
            out = src / f"export{suffix}"
        else:
            out = src.parent / f"export-{src.stem}{suffix}"
        check_out_dir(out)
        check_not_input(out, [src], [*_data_folders(str(src), args.overrides), args.support])
        model = from_checkpoint(src, args.overrides, args.device)
        if args.support:
            model.set_support(args.support, progress=True)
        if args.format == "onnx":
            from paws.apply.onnx_export import check_onnx, export_onnx

            write = export_onnx(model, out, progress=True)
        else:
            write = model.export(out, progress=True)
        print(f"exported the {model.summary} to {write}")
        if args.format == "onnx":
            diff = check_onnx(write, model)
            print(
                "ONNX Runtime matches PyTorch to "
                + ", ".join(f"{v:.1e} ({k})" for k, v in diff.items())
                + " on 7 random images"
            )
        _track_export(src, out, args.format)
        return 0

    return run


def _track_export(src: Path, out: Path, fmt: str) -> None:
    """An export of a tracked run joins the run's tracked runs (files under ``export/`` or
    ``export-onnx/``), and for MLflow, a safetensors export also as an MLflow model."""
    from paws import rundir
    from paws.tracking import log_files, read_records

    run = rundir.output_dir(src)
    records = read_records(run)
    if not records:
        return
    files = sorted(f for f in out.iterdir() if f.is_file())
    folder = "export-onnx" if fmt == "onnx" else "export"
    tracked = log_files(run, files, folder, what="export")
    if tracked:
        print(f"export added to the run's tracked runs: {', '.join(tracked)}")
    if fmt == "safetensors" and "mlflow" in tracked:
        from paws.apply.mlflow_model import log_model

        uri = log_model(run, out)
        print(f"mlflow: the export is the model {uri}: mlflow.pyfunc.load_model serves it")


@command("config", "show a resolved config, or every key with its doc")
def _config_cmd_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    _config_args(p)
    p.add_argument("--keys", action="store_true", help="list every key with type and doc")

    def run(args: argparse.Namespace) -> int:
        import yaml

        from paws.config import describe, to_dict

        if args.keys:
            print(describe())
        else:
            from paws.models import check_encoder

            cfg = _load(args)
            check_encoder(cfg.model.encoder)
            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0

    return run


@command("report", "draw a run's curves, accuracy, confusion matrix, t-SNE map and predictions")
def _report_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run directories (several: overlaid); one run's report is also added to its "
        "tracked MLflow and W&B runs",
    )
    p.add_argument(
        "--out", metavar="DIR", help="where report.png and report.html go (default: first RUN_DIR)"
    )
    p.add_argument(
        "--tsne-points",
        type=int,
        default=2000,
        metavar="N",
        help="test images in the t-SNE map (default 2000; 0: no map)",
    )
    p.add_argument(
        "--grid-images",
        type=int,
        default=32,
        metavar="N",
        help="test images shown with their predictions (default 32; 0: none)",
    )

    def run(args: argparse.Namespace) -> int:
        from paws.report import build_report
        from paws.tracking import log_files

        if args.tsne_points < 0 or args.grid_images < 0:
            raise UserError("--tsne-points and --grid-images must be 0 or more")
        paths = build_report(args.runs, args.out, args.tsne_points, args.grid_images)
        print(f"report written: {paths['html']} and {paths['png']}")
        if len(args.runs) == 1:  # a run's own report goes to its tracked runs
            tracked = log_files(args.runs[0], [paths["html"], paths["png"]])
            if tracked:
                print(f"report added to the run's tracked runs: {', '.join(tracked)}")
        return 0

    return run
