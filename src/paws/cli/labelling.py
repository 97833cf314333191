"""``paws suggest``: the images worth labelling next, as a CSV to fill in (and a contact sheet)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from paws.cli.base import _config_args, _data_folders, command
from paws.data.labels import filled_labels
from paws.errors import UserError
from paws.files import check_not_input, check_out_file


def _refuse_filled(out: Path) -> None:
    """A suggestion file whose labels someone filled in (or any file paws cannot read as
    one) is never overwritten."""
    if not out.is_file():
        return
    try:
        filled = filled_labels(out)
    except UserError as e:
        raise UserError(
            f"--out {out} already exists and is not a suggestion file ({e}); it is left as it "
            "is: choose another --out"
        ) from e
    if filled:
        raise UserError(
            f"{out} already holds {filled} labels; train with it "
            f"(--set data.labels_file={out}) and choose another --out"
        )


@command("suggest", "which images to label next: a CSV to fill in (and a contact sheet)")
def _suggest_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    p.add_argument(
        "run",
        nargs="?",
        metavar="RUN_DIR",
        help="a trained run directory or checkpoint (none: a cold start, no labels yet; a "
        "label-free run of paws train: a cold start in its embedding)",
    )
    p.add_argument(
        "--unlabeled",
        metavar="DIR",
        help="candidate images (any layout); default: the run's (or the config's) unlabelled set",
    )
    p.add_argument("-n", type=int, required=True, metavar="N", help="how many images to suggest")
    p.add_argument(
        "--out", default="next.csv", metavar="FILE", help="the CSV to write (default: next.csv)"
    )
    p.add_argument("--html", metavar="FILE", help="also write a contact sheet of thumbnails")
    p.add_argument(
        "--format",
        choices=["csv", "labelstudio"],
        help="csv (path,label,suggested_label,confidence,reason; the default) or labelstudio: "
        "Label Studio tasks JSON with the suggestions as pre-annotations, and a labelling "
        "config beside it (the default for an --out ending in .json)",
    )
    p.add_argument(
        "--document-root",
        metavar="DIR",
        help="labelstudio: Label Studio's LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, the folder "
        "the image URLs are relative to (default: that variable, else the folder above the "
        "images')",
    )
    p.add_argument(
        "--strategy",
        choices=["mixed", "coverage", "typiclust", "uncertainty", "random", "kcenter"],
        help="coverage (the default, but in a label-free run): the image nearest each "
        "k-means centre, the labelled images fixed centres; typiclust (the default in a "
        "label-free run): the most typical image of each k-means cluster; mixed: "
        "typical images of the groups PAWS-NN is least sure of, "
        "spread over the suggested classes; uncertainty: smallest PAWS-NN margin; random; "
        "kcenter: k-center greedy (farthest first: outliers, worse than random for small "
        "batches)",
    )
    p.add_argument(
        "--features",
        choices=["auto", "pixels", "encoder"],
        default="auto",
        help="cold start: what to cluster; pixels, or the config's encoder (model.weights, or "
        "random weights); auto: the encoder with model.weights, else pixels",
    )
    p.add_argument(
        "--space",
        choices=["trunk", "head"],
        default="trunk",
        help="with a run: the embedding mixed, coverage and kcenter choose in; trunk (the "
        "default, measured better in benchmarks/label_selection.py) or the projection head's",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of k-means and random choices")
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="compute device (auto: CUDA when available)",
    )
    _config_args(p)

    return _run_suggest


def _run_suggest(args: argparse.Namespace) -> int:
    """paws suggest: the suggestions, written as the arguments ask."""
    from paws.labelling.sheet import write_sheet
    from paws.labelling.suggest import describe
    from paws.progress import info

    if args.n < 1:
        raise UserError("-n must be at least 1")
    out = check_out_file(args.out)  # before minutes of embedding
    data = [*_run_data(args), args.unlabeled]
    check_not_input(out, [], data)
    if args.html:
        check_out_file(args.html, "--html")
        check_not_input(args.html, [out], data, "--html")
    studio = (args.format or ("labelstudio" if out.suffix == ".json" else "csv")) != "csv"
    if args.document_root and not studio:
        raise UserError("--document-root applies to --format labelstudio")
    if not studio:
        _refuse_filled(out)
    s = _suggest(args)
    if studio:
        _write_labelstudio(s, out, args.document_root)
    else:
        s.write(out)
    d = describe(s)
    groups = ", ".join(f"{k} {v}" for k, v in sorted(d["groups"].items(), key=lambda g: -g[1]))
    by = f"; suggested classes: {groups}" if s.picks and s.picks[0].suggested else ""
    info(f"{s.strategy} on {s.features}, among {d['pool']} images{by}")
    fill = "import it into Label Studio" if studio else "fill in its label column"
    print(f"{d['images']} images to label written to {out} ({fill})")
    if args.html:
        print(f"contact sheet: {write_sheet(s, args.html, out.name)}")
    return 0


def _write_labelstudio(s, out: Path, document_root: str | None) -> None:
    """Write Label Studio tasks and say how to serve their images."""
    from paws.data.labelstudio import ROOT_VARIABLE, SERVING_VARIABLE
    from paws.labelling.labelstudio import write_tasks
    from paws.progress import info

    files = write_tasks(s, out, document_root)
    config = f"labelling config {files.config}; " if files.config else ""
    info(
        f"Label Studio: start it with {SERVING_VARIABLE}=true {ROOT_VARIABLE}="
        f"{files.document_root}, add a Local files storage of {files.storage} (no sync), "
        f"{config}then import {files.tasks}; its JSON or CSV export is a data.labels_file"
    )


def _run_data(args: argparse.Namespace) -> list[str]:
    """The data paths of the run (or, for a cold start, of the config) suggestions read."""
    if args.run:
        return _data_folders(args.run, args.overrides)
    from paws.config import DATA_PATHS, load_config

    data = load_config(args.config, args.overrides).data
    return [v for v in (getattr(data, k) for k in DATA_PATHS) if v]


def _suggest(args: argparse.Namespace):
    """The suggestions the arguments ask for: from a run, or a cold start from a config."""
    from paws import runtime
    from paws.config import load_config
    from paws.labelling.suggest import suggest_cold, suggest_from_run
    from paws.rundir import checkpoint_config

    device_set = [f"run.device={args.device}"]
    if args.run:
        if args.config:
            raise UserError("--config applies to a cold start; a run has its own config")
        overrides = [*args.overrides, *device_set]
        device = runtime.setup(checkpoint_config(args.run, overrides))
        return suggest_from_run(
            args.run,
            args.n,
            args.strategy,
            args.unlabeled,
            overrides,
            device,
            args.seed,
            space=args.space,
        )
    cfg = load_config(args.config, [*args.overrides, *device_set])
    device = runtime.setup(cfg)
    return suggest_cold(
        cfg, args.n, args.unlabeled, args.strategy, args.features, device, args.seed
    )
