"""Applying a model at the encoder's cost: images/s of ``paws predict``'s path against bare
decoding and the bare forward on the same files, in one run.

For each of a PNG and a JPEG folder of N Fashion-MNIST images (default 10,000, written once
into ``--dir``), in turns and repeated (medians):

- **predict**: ``Predictor.predictions(files)``, what ``paws predict`` calls: reading and
  preprocessing (:func:`paws.data.eval_view.read_batches`, decoding overlapped with the
  network), the forward, soft nearest neighbours and the known score;
- **decode**: the same reading and preprocessing alone, with a thread per core;
- **forward**: the network alone on the same batches already in memory.

It prints images/s of each and the ratio of predict's time to the slower of the other two
(1.00: prediction costs no more than its slowest part). The model is ``--run`` (a run
directory, checkpoint or export), or by default an untrained network of the default config
with a random support of 100 images: the forward's cost is the same.

Usage::

    python benchmarks/apply_speed.py                 # 10,000 images, default config
    python benchmarks/apply_speed.py --n 2000 --repeats 3
    python benchmarks/apply_speed.py --run runs/default --draft
    python benchmarks/apply_speed.py --draft-check photo1.jpg photo2.jpg
    python benchmarks/apply_speed.py --run runs/default --load-time
"""

# ruff: noqa: E402 - the environment is set before torch is imported
from __future__ import annotations

from paws.cli import quiet_idle_threads

quiet_idle_threads()  # as the paws command does: idle OpenMP threads sleep

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from paws import progress
from paws.apply.load import load
from paws.apply.predictor import Predictor, SoftNearestNeighbourPredictor, Support
from paws.apply.reading import ImageReader
from paws.config import load_config
from paws.data.builtin import load_fashion_mnist
from paws.data.eval_view import Preprocessing, batches_of, decode_workers, read_batches
from paws.data.sources import normalisation
from paws.models import Architecture, build_network


def write_folders(root: Path, n: int) -> dict[str, list[Path]]:
    """The first ``n`` Fashion-MNIST training images as ``root/png`` and ``root/jpeg`` (JPEG
    quality 90), written once; returns the files of each."""
    out: dict[str, list[Path]] = {}
    train = None
    for fmt, ext in (("png", ".png"), ("jpeg", ".jpg")):
        folder = root / f"{fmt}_{n}"
        files = [folder / f"{i:05d}{ext}" for i in range(n)]
        if not all(f.exists() for f in files):
            if train is None:
                train, _ = load_fashion_mnist(None)
            folder.mkdir(parents=True, exist_ok=True)
            for i, f in enumerate(files):
                im = Image.fromarray(train.images[i % len(train), 0].numpy(), mode="L")
                im.save(f, quality=90) if fmt == "jpeg" else im.save(f)
        out[fmt] = files
    return out


def default_predictor(batch_size: int) -> Predictor:
    """An untrained network of the default config, classifying against 100 random supports."""
    cfg = load_config(None)
    arch = Architecture.from_config(cfg, 1)
    net = build_network(arch, seed=0).eval()
    mean, std = normalisation(cfg, "fashion_mnist", 1)
    prep = Preprocessing(cfg.views.large_size, cfg.views.eval_crop, mean, std, 1)
    with torch.no_grad():
        x = torch.randn(100, 1, prep.size, prep.size)
        emb = net.embed(x, cfg.eval.features).float()
        known = net.embed(x, "trunk").float()
    support = Support(emb, torch.arange(100) % 10, [str(c) for c in range(10)], "head", known)
    return SoftNearestNeighbourPredictor(
        net, "pretrain", arch, ImageReader(prep, batch_size), "cpu", support=support
    )


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(model: Predictor, files: list[Path], repeats: int) -> dict[str, float]:
    """Median seconds of predict, decode and forward over ``repeats`` turns."""
    prep, bs = model.preprocessing, model.batch_size
    cores = len(os.sched_getaffinity(0))
    n = len(files)

    def decode() -> list[torch.Tensor]:
        return [r.x for r in read_batches(files, batches_of(n, bs), prep, workers=cores)]

    inputs = decode()  # also the forward's inputs, and a warm-up of the file cache

    @torch.no_grad()
    def forward() -> None:
        for x in inputs:
            model.net.embed_features(x.to(model.device), ["head", "trunk"])

    model.predictions(files[: 2 * bs])  # warm-up: the support's threshold, lazy kernels
    times: dict[str, list[float]] = {"predict": [], "decode": [], "forward": []}
    for _ in range(repeats):
        times["predict"].append(timed(lambda: model.predictions(files)))
        times["decode"].append(timed(decode))
        times["forward"].append(timed(forward))
    out = {k: statistics.median(v) for k, v in times.items()}
    out["ratio"] = out["predict"] / max(out["decode"], out["forward"])
    out["ratios"] = [p / max(d, f) for p, d, f in zip(*times.values())]
    return out


def draft_difference(files: list[Path]) -> None:
    """How far Pillow's JPEG ``draft`` moves the evaluation view, for a 20-px grey model (the
    default) and a 224-px colour one (resize 256, ImageNet): largest and mean absolute
    difference of the views before normalisation, in 8-bit levels."""
    for size, crop, channels in ((20, 1.0, 1), (224, 0.875, 3)):
        prep = Preprocessing(size, crop, (0.0,) * channels, (1.0,) * channels, channels)
        for f in files:
            full, draft = (
                next(read_batches([f], [[0]], prep, draft=d)).x * 255 for d in (False, True)
            )
            diff = (full - draft).abs()
            with Image.open(f) as im:
                shape = f"{im.size[0]}x{im.size[1]}"
            print(
                f"draft {f.name} ({shape}) -> {size}px: max {diff.max():.1f}, mean "
                f"{diff.mean():.2f} levels of 255"
            )


_LOAD_TIMING = """
import sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import paws
from paws.apply.load import load
t2 = time.perf_counter()
model = load(sys.argv[1], device="cpu")
t3 = time.perf_counter()
model.ready()
t4 = time.perf_counter()
model.predict([sys.argv[2]])
t5 = time.perf_counter()
print(f"{t1 - t0:.2f} {t2 - t1:.2f} {t3 - t2:.2f} {t4 - t3:.2f} {t5 - t4:.2f}")
"""


def load_time(run: str, image: Path) -> None:
    """Seconds from a fresh process to the first prediction of ``paws.load(run)``, by part."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _LOAD_TIMING, run, str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    torch_s, paws_s, load_s, support_s, first_s = (float(x) for x in out)
    total = sum(float(x) for x in out)
    print(
        f"paws.load({run}) to the first prediction: {total:.2f} s = import torch {torch_s:.2f} "
        f"+ import paws {paws_s:.2f} + load {load_s:.2f} + support (the run's labelled images) "
        f"{support_s:.2f} + first prediction {first_s:.2f}; after the import: "
        f"{load_s + support_s + first_s:.2f} s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000, help="images in each folder")
    parser.add_argument("--dir", help="where the folders are written (default: a temporary one)")
    parser.add_argument("--run", help="a run directory, checkpoint or export to apply")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="turns; medians are printed")
    parser.add_argument("--workers", type=int, help="decoding threads of the predict path")
    parser.add_argument("--draft", action="store_true", help="JPEG draft decoding (predict)")
    parser.add_argument("--formats", nargs="+", default=["png", "jpeg"])
    parser.add_argument(
        "--draft-check",
        nargs="+",
        metavar="JPEG",
        help="only print how much draft decoding changes these JPEGs' evaluation views",
    )
    parser.add_argument(
        "--load-time", action="store_true", help="with --run: only time paws.load's first answer"
    )
    args = parser.parse_args(argv)
    progress.set_quiet(True)
    if args.load_time:
        with tempfile.TemporaryDirectory() as tmp:
            load_time(args.run, write_folders(Path(args.dir or tmp), 1)["png"][0])
        return 0
    if args.draft_check:
        draft_difference([Path(f) for f in args.draft_check])
        return 0

    model = load(args.run, device="cpu") if args.run else default_predictor(args.batch_size)
    model.ready()
    model.reader = ImageReader(
        model.preprocessing,
        args.batch_size,
        model.reader.on_bad_image,
        model.reader.max_pixels,
        draft=args.draft,
        workers=args.workers,
    )
    load_avg = os.getloadavg()[0]
    workers = args.workers or decode_workers(model.device)
    print(
        f"model: {args.run or 'default config, untrained'}; {torch.get_num_threads()} torch "
        f"threads, {workers} decoding threads, {os.cpu_count()} CPUs, load average "
        f"{load_avg:.1f}; batch {args.batch_size}, {args.n} images",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_folders(Path(args.dir or tmp), args.n)
        for fmt in args.formats:
            r = measure(model, folders[fmt], args.repeats)
            spread = ", ".join(f"{x:.2f}" for x in r["ratios"])
            print(
                f"{fmt:5s} predict {args.n / r['predict']:7.0f} img/s  decode "
                f"{args.n / r['decode']:7.0f} img/s  forward {args.n / r['forward']:7.0f} "
                f"img/s  ratio to the slower {r['ratio']:.2f} (turns: {spread})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
