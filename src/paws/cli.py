"""The ``paws`` command: thin wrappers that parse arguments and call the library.

Mistakes a user can make end in one line on stderr and exit status 2 (``--debug`` shows the
traceback); interrupted training exits with 128 + the signal number after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from paws.errors import UserError

__all__ = ["main", "COMMANDS", "quiet_idle_threads"]

COMMANDS: dict[
    str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {}


def _set_option(p: argparse.ArgumentParser, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` option, collected into ``args.overrides``."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def command(name: str, help: str):  # noqa: A002 - argparse's word
    """Register ``paws NAME``: decorate a function that adds arguments and returns a runner."""

    def register(add_args: Callable[[argparse.ArgumentParser], Callable]) -> Callable:
        COMMANDS[name] = (add_args, help)  # type: ignore[assignment]
        return add_args

    return register


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config file or recipe name "
        "(fashion_mnist, cifar10_wrn28_2, imagenet_resnet50_10pct, ...); default: "
        "the Fashion-MNIST CPU recipe",
    )
    _set_option(p, "override a config key, e.g. --set optim.epochs=20 (repeatable)")


def _load(args: argparse.Namespace):
    from paws.config import load_config

    return load_config(args.config, args.overrides)


def _default_out(prefix: str, dataset: str) -> Path:
    return Path("runs") / f"{prefix}-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


@command("train", "pre-train PAWS (default: Fashion-MNIST with 10 labels per class)")
def _train_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    _config_args(p)
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/paws-...)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )

    def run(args: argparse.Namespace) -> int:
        from paws import distributed, runtime
        from paws.config import load_config
        from paws.train import train

        if args.resume:
            run_dir = Path(args.resume)
            if not (run_dir / "config.yaml").is_file():
                raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
            cfg = load_config(args.config or run_dir / "config.yaml", args.overrides)
            out = run_dir
        else:
            cfg = _load(args)
            out = Path(args.out) if args.out else _default_out("paws", cfg.data.dataset)
        try:
            # Joins torchrun's process group, so that every rank writes to rank 0's
            # (time-stamped) run directory.
            device = runtime.setup(cfg)
            out = Path(distributed.broadcast_object(str(out)))
            result = train(cfg, out, resume=bool(args.resume), device=device)
            main = distributed.is_main()
        finally:
            distributed.destroy()
        if result["status"] == "interrupted":
            return 128 + int(result.get("signal") or 2)
        if not main:
            return 0
        ev = result["eval"]
        if ev is not None and "pretrained" in ev:
            print(
                f"PAWS-NN test accuracy: top-1 {ev['pretrained']['top1']:.2f}% after "
                f"pre-training (final.pt), {ev['top1']:.2f}% after tightening (tighten.pt)  "
                f"top-5 {ev['top5']:.2f}%  ({ev['num_query']} test images, "
                f"{ev['num_support']} labelled supports)"
            )
        elif ev is not None:
            print(
                f"PAWS-NN test accuracy: top-1 {ev['top1']:.2f}%  top-5 {ev['top5']:.2f}%  "
                f"({ev['num_query']} test images, {ev['num_support']} labelled supports)"
            )
        if result.get("skipped"):
            print(
                f"skipped {result['skipped']} unreadable images "
                f"(listed in {out / 'skipped_images.txt'})"
            )
        print(f"run saved in {out}")
        return 0

    return run


@command("eval", "PAWS-NN accuracy of a checkpoint (labelled images as support)")
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
        from paws.data import ImageSet, load_datasets, scan_images
        from paws.evaluate import paws_nn, unknown_detection
        from paws.rundir import restore_model

        overrides = list(args.overrides)
        if args.features:
            overrides.append(f"eval.features={args.features}")
        cfg, model, _ = restore_model(args.checkpoint, overrides)
        device = runtime.setup(cfg)
        data = load_datasets(cfg)
        if data.test is None:
            raise UserError("no test set to evaluate: set data.test to a <class>/<image> folder")
        model.to(device)
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
        print(
            f"PAWS-NN top-1 {out['top1']:.2f}%  top-5 {out['top5']:.2f}%  balanced top-1 "
            f"{out['balanced_top1']:.2f}%  ({out['num_query']} queries, {out['num_support']} "
            f"supports, {out['features']} features)"
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


@command("baseline", "supervised-only baseline on the labelled images, same encoder and budget")
def _baseline_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    _config_args(p)
    p.add_argument("--out", metavar="DIR", help="where to write baseline.json")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    def run(args: argparse.Namespace) -> int:
        from paws import runtime
        from paws.baseline import train_baseline

        cfg = _load(args)
        result = train_baseline(cfg, args.out, device=runtime.setup(cfg))
        if args.json:
            _print_json(result)
        else:
            print(
                f"supervised-only test accuracy: top-1 {result['top1']:.2f}%  top-5 "
                f"{result['top5']:.2f}%  ({result['num_labeled']} labelled images, "
                f"{result['steps']} steps = {result['epochs']:g} epochs, final training loss "
                f"{result['train_loss']:.3g}, {result['seconds']:.0f} s)"
            )
        return 0

    return run


def _checkpoint_overrides(p: argparse.ArgumentParser, example: str) -> None:
    _set_option(p, f"override a key of the checkpoint's config, e.g. --set {example} (repeatable)")


def _setup_for(path: str, overrides: list[str], pretrained: bool = False):
    """Set the process up for a checkpoint's config; returns the device."""
    from paws import runtime
    from paws.rundir import checkpoint_config

    return runtime.setup(checkpoint_config(path, overrides, pretrained))


@command("finetune", "fine-tune a linear classifier and the encoder on the labels (Appendix A)")
def _finetune_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("checkpoint", help="pre-trained checkpoint file or run directory")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where to write finetune.pt and finetune.json "
        "(default: the checkpoint's run directory)",
    )
    _checkpoint_overrides(p, "finetune.lrs=[0.05,0.1]")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    def run(args: argparse.Namespace) -> int:
        from paws.finetune import finetune_checkpoint

        device = _setup_for(args.checkpoint, args.overrides, pretrained=True)
        r = finetune_checkpoint(args.checkpoint, args.overrides, args.out, device=device)
        if args.json:
            _print_json(r)
            return 0
        for row in r["sweep"]:
            print(
                f"  lr {row['lr']:<6g} {row['epochs']:>4d} epochs  "
                f"validation top-1 {row['val_top1']:6.2f}%"
            )
        val = f" (validation top-1 {r['val_top1']:.2f}%)" if r["val_top1"] is not None else ""
        print(f"chosen: lr {r['lr']:g}, {r['epochs']} epochs{val}")
        if r["test"] is not None:
            print(
                f"fine-tuned test accuracy: top-1 {r['test']['top1']:.2f}%  top-5 "
                f"{r['test']['top5']:.2f}%  ({r['test']['num_query']} test images, single "
                f"centre crop); PAWS-NN of the pre-trained model: top-1 "
                f"{r['paws_nn']['top1']:.2f}%"
            )
        print(f"fine-tuned model saved as {r['checkpoint']}")
        return 0

    return run


@command("tighten", "tighten the labelled clusters with SuNCEt, then PAWS-NN (Appendix C)")
def _tighten_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("checkpoint", help="pre-trained checkpoint file or run directory")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="where to write tighten.pt and tighten.json (default: the checkpoint's run directory)",
    )
    _checkpoint_overrides(p, "tighten.steps=100")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    def run(args: argparse.Namespace) -> int:
        from paws.tighten import tighten_checkpoint

        device = _setup_for(args.checkpoint, args.overrides, pretrained=True)
        r = tighten_checkpoint(args.checkpoint, args.overrides, args.out, device=device)
        if args.json:
            _print_json(r)
            return 0
        print(
            f"{r['steps']} SuNCEt steps of {r['classes']} classes x {r['images_per_class']} "
            f"images: loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}"
        )
        if r["paws_nn_after"] is not None:
            print(
                f"PAWS-NN test accuracy: top-1 {r['paws_nn_before']['top1']:.2f}% before, "
                f"{r['paws_nn_after']['top1']:.2f}% after tightening  "
                f"({r['paws_nn_after']['num_query']} test images)"
            )
        print(f"tightened model saved as {r['checkpoint']}")
        return 0

    return run


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint file, run directory or export folder")
    p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="compute device (auto: CUDA when available)",
    )
    p.add_argument("--batch-size", type=int, metavar="N", help="images per forward pass")
    _checkpoint_overrides(p, "data.root=DIR")


def _open_model(args: argparse.Namespace):
    from paws.inference import load

    model = load(args.checkpoint, device=args.device, overrides=args.overrides)
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        model.batch_size = args.batch_size
    return model


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
        from paws.inference import expand_images
        from paws.outputs import predictions_text
        from paws.progress import info

        if args.top_k < 1:
            raise UserError("--top-k must be at least 1")
        fmt = args.format or ("json" if (args.out or "").endswith(".json") else "csv")
        files = expand_images(args.images)
        model = _open_model(args)
        if args.support:
            model.set_support(args.support, progress=True)
        if model.is_classifier:
            info(f"classifying {len(files)} images with the fine-tuned classifier")
        else:
            s = model.load_support(progress=True)
            info(
                f"classifying {len(files)} images against {len(s.labels)} support images of "
                f"{len(s.classes)} classes ({s.features} features, tau {model.tau:g})"
            )
        predictions = model.predictions(files, top_k=args.top_k, progress=True)
        if not model.is_classifier:
            flagged = sum(p.unknown for p in predictions)
            info(
                f"{flagged} of {len(files)} images are unknown: known score below "
                f"{model.unknown_threshold:.3f} (eval.unknown_quantile "
                f"{model.unknown_quantile:g} of the labelled images' own scores)"
            )
        text = predictions_text(files, predictions, fmt)
        if args.out:
            Path(args.out).write_text(text)
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
        from paws.inference import expand_images
        from paws.outputs import EMBEDDING_SUFFIXES, write_embeddings
        from paws.progress import info

        if Path(args.out).suffix not in EMBEDDING_SUFFIXES:
            raise UserError(f"--out must end in .npy or .safetensors, got {Path(args.out).name}")
        files = expand_images(args.images)
        model = _open_model(args)
        emb = model.embed(files, features=args.features, progress=True)
        where = write_embeddings(args.out, emb, files, args.features)
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
        from paws.inference import from_checkpoint

        src = Path(args.checkpoint)
        suffix = "-onnx" if args.format == "onnx" else ""
        if args.out:
            out = Path(args.out)
        elif src.is_dir():
            out = src / f"export{suffix}"
        else:
            out = src.parent / f"export-{src.stem}{suffix}"
        model = from_checkpoint(src, args.overrides, args.device)
        if args.support:
            model.set_support(args.support, progress=True)
        if args.format == "onnx":
            from paws.onnx_export import check_onnx, export_onnx

            write = export_onnx(model, out, progress=True)
        else:
            write = model.export(out, progress=True)
        what = (
            "fine-tuned classifier"
            if model.is_classifier
            else (f"{model.kind} model with {len(model.support.labels)} support embeddings")
        )
        print(f"exported {what} ({len(model.classes)} classes) to {write}")
        if args.format == "onnx":
            diff = check_onnx(write, model)
            print(
                "ONNX Runtime matches PyTorch to "
                + ", ".join(f"{v:.1e} ({k})" for k, v in diff.items())
                + " on 7 random images"
            )
        return 0

    return run


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
        from paws.tracking import log_report

        if args.tsne_points < 0 or args.grid_images < 0:
            raise UserError("--tsne-points and --grid-images must be 0 or more")
        paths = build_report(args.runs, args.out, args.tsne_points, args.grid_images)
        print(f"report written: {paths['html']} and {paths['png']}")
        if len(args.runs) == 1:  # a run's own report goes to its tracked runs
            tracked = log_report(args.runs[0], [paths["html"], paths["png"]])
            if tracked:
                print(f"report added to the run's tracked runs: {', '.join(tracked)}")
        return 0

    return run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paws", description="PAWS semi-supervised learning: pre-train, evaluate, apply."
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (add_args, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(make_runner=add_args(p))
        # Also accepted after the command (paws train --quiet); SUPPRESS keeps a value given
        # before it.
        p.add_argument(
            "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress output"
        )
    return parser


def _one_line(e: BaseException) -> str:
    """The user-facing line of an error, also when a data-loader worker wrapped it."""
    text = str(e)
    marker = "paws.errors.UserError: "
    if marker in text:
        text = text.rsplit(marker, 1)[1]
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def quiet_idle_threads() -> None:
    """Let idle OpenMP threads sleep instead of spinning (unless the user chose otherwise).

    Must run before torch is imported. On a CPU shared with other work, threads spinning between
    parallel regions made a training step about 1.4 times and batch augmentation about 20 times
    slower (2 cores); a sleeping thread costs a wake-up of microseconds per region.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``paws`` console script."""
    quiet_idle_threads()
    argv = list(sys.argv[1:] if argv is None else argv)
    n = 0  # global flags come first, in any order; the command defaults to train
    while n < len(argv) and argv[n] in ("--quiet", "--debug"):
        n += 1
    if n == len(argv) or argv[n].startswith("-") and argv[n] not in ("-h", "--help"):
        argv = [*argv[:n], "train", *argv[n:]]
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train"])
    from paws import progress

    previous = progress.set_quiet(args.quiet)  # inherited by data-loader workers
    try:
        return int(args.make_runner(args) or 0)
    except UserError as e:
        if args.debug:
            raise
        print(f"paws: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paws: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a wrapped user error from a data-loader worker
        if not args.debug and "paws.errors.UserError: " in str(e):
            print(f"paws: error: {_one_line(e)}", file=sys.stderr)
            return 2
        raise
    finally:
        progress.set_quiet(previous)


if __name__ == "__main__":
    sys.exit(main())
