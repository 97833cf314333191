"""What every ``paws`` command shares: the command registry and the common options."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

from paws.errors import UserError

__all__ = ["COMMANDS", "command"]

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


def _checkpoint_overrides(p: argparse.ArgumentParser, example: str) -> None:
    _set_option(p, f"override a key of the checkpoint's config, e.g. --set {example} (repeatable)")


def _setup_for(path: str, overrides: list[str], pretrained: bool = False):
    """Set the process up for a checkpoint's config; returns the device."""
    from paws import runtime
    from paws.rundir import checkpoint_config

    return runtime.setup(checkpoint_config(path, overrides, pretrained))


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
    p.add_argument(
        "--jpeg-draft",
        action="store_true",
        help="decode large JPEGs at a reduced scale: faster, but the pixels differ from the "
        "evaluation's (a few levels of 255 on average), so answers may differ from paws eval's",
    )
    _checkpoint_overrides(p, "data.root=DIR")


def _data_folders(path: str, overrides: list[str]) -> list[str]:
    """The data folders and files of the run a checkpoint or run directory holds (none for
    an export folder, which keeps no config): what no output may overwrite or land in."""
    from paws.config import DATA_PATHS
    from paws.rundir import checkpoint_config

    try:
        data = checkpoint_config(path, overrides).data
    except UserError:  # an export folder, or a file the model's own loading will name
        return []
    return [v for v in (getattr(data, k) for k in DATA_PATHS) if v]


def _open_model(args: argparse.Namespace):
    from paws.apply.load import load

    model = load(args.checkpoint, device=args.device, overrides=args.overrides)
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        model.reader = dataclasses.replace(model.reader, batch_size=args.batch_size)
    if args.jpeg_draft:
        model.reader = dataclasses.replace(model.reader, draft=True)
    return model
