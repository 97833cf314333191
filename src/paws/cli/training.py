"""``paws train``, ``baseline``, ``finetune`` and ``tighten``: the commands that train."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from paws.cli.base import (
    _checkpoint_overrides,
    _config_args,
    _default_out,
    _load,
    _print_json,
    _setup_for,
    command,
)
from paws.errors import UserError


def _lost_peer_line(out: Path) -> str:
    """What a rank says when another process of its run stopped."""
    from paws import distributed

    rank, world = distributed.get_rank(), distributed.get_world_size()
    other = f"rank {1 - rank}" if world == 2 else "another process"
    where = (
        f"resume from its last checkpoint with: paws train --resume {out}"
        if (out / "last.pt").is_file()
        else f"no checkpoint had been written yet: start it again (--out {out})"
    )
    return f"rank {rank} of {world}: {other} of this run stopped; {where}"


@command("train", "pre-train PAWS (default: Fashion-MNIST with 10 labels per class)")
def _train_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    _config_args(p)
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/paws-...)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint"
    )
    p.add_argument(
        "--init",
        metavar="RUN_DIR",
        help="start a new run from RUN_DIR's pre-trained weights (its last.pt, or a .pt "
        "file) with this config's schedule and labels: the next round of a labelling loop",
    )

    def run(args: argparse.Namespace) -> int:
        from paws import distributed, runtime
        from paws.pretrain.train import train
        from paws.rundir import resume_config

        if args.resume and args.init:
            raise UserError("--init starts a new run; --resume continues one: give one of them")
        if args.resume:
            out = Path(args.resume)
            cfg = resume_config(out, args.config, args.overrides)
        else:
            cfg = _load(args)
            out = Path(args.out) if args.out else _default_out("paws", cfg.data.dataset)
        try:
            # Joins torchrun's process group, so that every rank writes to rank 0's
            # (time-stamped) run directory.
            device = runtime.setup(cfg)
            out = Path(distributed.broadcast_object(str(out)))
            try:
                result = train(cfg, out, resume=bool(args.resume), device=device, init=args.init)
            except Exception as e:  # noqa: BLE001 - only a lost process becomes one line
                if not distributed.lost_peer(e):
                    raise
                raise UserError(_lost_peer_line(out)) from e
            main = distributed.is_main()
        finally:
            distributed.destroy()
        if result["status"] == "interrupted":
            return 128 + int(result.get("signal") or 2)
        if not main:
            return 0
        ev = result["eval"]
        if ev is not None:
            print(_results_line(ev))
        if result.get("label_free"):
            print(
                "a label-free embedding (SimCLR): choose the first images to label with "
                f"paws suggest {out} -n N, then train with their labels and --init {out}"
            )
        if result.get("skipped"):
            print(
                f"skipped {result['skipped']} unreadable images "
                f"(listed in {out / 'skipped_images.txt'})"
            )
        print(f"run saved in {out}")
        return 0

    return run


_WHAT = {
    "final.pt": "after pre-training",
    "tighten.pt": "after tightening",
    "distill.pt": "the student",
}


def _results_line(ev: dict) -> str:
    """The line ``paws train`` ends with: the test accuracy of the model the run chose, and of
    the others beside it."""
    chosen = ev["model"]
    others = [
        f"{c['top1']:.2f}% {_WHAT.get(f, f)} ({f})"
        for f, c in (ev.get("candidates") or {}).items()
        if f != chosen
    ]
    beside = f" (the others: {', '.join(others)})" if others else ""
    return (
        f"test accuracy of the chosen model, {chosen} ({_WHAT.get(chosen, chosen)}): top-1 "
        f"{ev['top1']:.2f}%  top-5 {ev['top5']:.2f}%{beside}  ({ev['num_query']} test images, "
        f"{ev['num_support']} labelled supports)"
    )


@command("baseline", "supervised-only baseline on the labelled images, same encoder and budget")
def _baseline_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    _config_args(p)
    p.add_argument("--out", metavar="DIR", help="where to write baseline.json")
    p.add_argument("--json", action="store_true", help="print the result as JSON")

    def run(args: argparse.Namespace) -> int:
        from paws import runtime
        from paws.after.baseline import train_baseline

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
        from paws.after.finetune import finetune_checkpoint

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


def _step_args(
    p: argparse.ArgumentParser,
    name: str,
    example: str,
    what: str = "pre-trained checkpoint file or run directory",
) -> None:
    """The arguments of a step after pre-training that writes ``NAME.pt`` and ``NAME.json``."""
    p.add_argument("checkpoint", help=what)
    p.add_argument(
        "--out",
        metavar="DIR",
        help=f"where to write {name}.pt and {name}.json (default: the checkpoint's run directory)",
    )
    _checkpoint_overrides(p, example)
    p.add_argument("--json", action="store_true", help="print the report as JSON")


@command("tighten", "tighten the labelled clusters with SuNCEt, then PAWS-NN (Appendix C)")
def _tighten_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    _step_args(p, "tighten", "tighten.steps=100")

    def run(args: argparse.Namespace) -> int:
        from paws.after.tighten import tighten_checkpoint

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


@command("distill", "train a student classifier on every unlabelled image against the teacher")
def _distill_args(p: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    _step_args(
        p,
        "distill",
        "distill.epochs=4",
        "run directory (its teacher: tighten.pt, else last.pt) or a pre-trained checkpoint",
    )

    def run(args: argparse.Namespace) -> int:
        from paws import distributed
        from paws.after.distill import distill_checkpoint

        device = _setup_for(args.checkpoint, args.overrides, pretrained=True)
        try:  # under torchrun, every process trains the student
            r = distill_checkpoint(args.checkpoint, args.overrides, args.out, device=device)
            main = distributed.is_main()
        finally:
            distributed.destroy()
        if not main:
            return 0
        if args.json:
            _print_json(r)
            return 0
        loss = (
            f": loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}"
            if r["loss_last"] is not None
            else ""
        )
        print(
            f"student: {r['steps']} steps on {r['kept']} of {r['num_unlabeled']} unlabelled "
            f"images against {r['teacher']}{loss}"
        )
        if r["test"] is not None:
            print(
                f"student test accuracy: top-1 {r['test']['top1']:.2f}%  top-5 "
                f"{r['test']['top5']:.2f}%  ({r['test']['num_query']} test images); its "
                f"teacher's PAWS-NN: top-1 {r['teacher_test']['top1']:.2f}%"
            )
        print(f"student saved as {r['checkpoint']}")
        return 0

    return run
