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
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.epochs=20 (repeatable)",
    )


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
        from paws import distributed
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
            # Under torchrun: join the process group now, so every rank writes to rank 0's
            # (time-stamped) run directory.
            distributed.init(cfg.run.device)
            out = Path(distributed.broadcast_object(str(out)))
            result = train(cfg, out, resume=bool(args.resume))
            main = distributed.is_main()
        finally:
            distributed.destroy()
        if result["status"] == "interrupted":
            return 128 + int(result.get("signal") or 2)
        if not main:
            return 0
        ev = result["eval"]
        if ev is not None:
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
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set data.root=/data/fmnist",
    )
    p.add_argument("--features", choices=["head", "trunk"], help="embedding to classify")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    def run(args: argparse.Namespace) -> int:
        from paws.data import load_datasets
        from paws.evaluate import paws_nn
        from paws.train import restore_model, setup_runtime

        overrides = list(args.overrides)
        if args.features:
            overrides.append(f"eval.features={args.features}")
        cfg, model, _ = restore_model(args.checkpoint, overrides)
        device = setup_runtime(cfg)
        data = load_datasets(cfg)
        if data.test is None:
            raise UserError("no test set to evaluate: set data.test to a <class>/<image> folder")
        model.to(device)
        ev = paws_nn(model, data, cfg, device, progress=True)
        out = {k: ev[k] for k in ("top1", "top5", "num_support", "num_query", "features")}
        if args.json:
            _print_json(out)
        else:
            print(
                f"PAWS-NN top-1 {out['top1']:.2f}%  top-5 {out['top5']:.2f}%  "
                f"({out['num_query']} queries, {out['num_support']} supports, "
                f"{out['features']} features)"
            )
        return 0

    return run


@command("baseline", "supervised-only baseline on the labelled images, same encoder and budget")
def _baseline_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    _config_args(p)
    p.add_argument("--out", metavar="DIR", help="where to write baseline.json")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    def run(args: argparse.Namespace) -> int:
        from paws.baseline import train_baseline

        cfg = _load(args)
        result = train_baseline(cfg, args.out)
        if args.json:
            _print_json(result)
        else:
            print(
                f"supervised-only test accuracy: top-1 {result['top1']:.2f}%  top-5 "
                f"{result['top5']:.2f}%  ({result['num_labeled']} labelled images, "
                f"{result['steps']} steps, {result['seconds']:.0f} s)"
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
            print(yaml.safe_dump(to_dict(_load(args)), sort_keys=False), end="")
        return 0

    return run


@command("report", "draw a run's curves, accuracy, confusion matrix, t-SNE map and predictions")
def _report_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (several: overlaid)")
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

        if args.tsne_points < 0 or args.grid_images < 0:
            raise UserError("--tsne-points and --grid-images must be 0 or more")
        paths = build_report(args.runs, args.out, args.tsne_points, args.grid_images)
        print(f"report written: {paths['html']} and {paths['png']}")
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
    if args.quiet:
        os.environ["PAWS_QUIET"] = "1"
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


if __name__ == "__main__":
    sys.exit(main())
