"""How much a PAWS training step costs beyond its encoder, and what PAWS-NN evaluation costs.

Training: takes the steps ``paws.pretrain.train.train`` takes (draw and augment the batch, set the
learning rate, forward, PAWS loss, backward, LARS, read the loss) and, in turns with them, the
bare encoder: a copy of the same model on the same view tensors already in memory (one forward
per crop size, supports with the large views, a trivial loss, backward). Prints images/s of
both, their ratio (step time / bare time; 1.00 means the step costs nothing beyond the encoder)
and the fraction of step time spent waiting for data. Alternating step by step and reporting
medians keeps a shared machine's changing load out of the ratio as far as possible; rerun to
see the spread. ``--train-check N`` also runs ``paws.pretrain.train.train`` itself and prints the
images/s of its metrics.csv.

Evaluation: PAWS-NN soft nearest neighbours for 60,000 supports x 10,000 queries (default),
once on random embeddings of the model's output size (``snn_classify`` alone) and once through
the full path (embedding the images with the model, then ``snn_classify``), each in a fresh
process that reports its peak memory (resident set size on the CPU, allocated memory on a GPU).

Usage::

    python benchmarks/step_overhead.py                       # Fashion-MNIST default config
    python benchmarks/step_overhead.py --config cifar10_wrn28_2 --set data.root=~/data/cifar
    python benchmarks/step_overhead.py --steps 40 --no-eval

Without the dataset on disk, ``--synthetic`` uses random images of the config's shape.

``--disk`` also measures the step when the images are read from disk: the Fashion-MNIST
training images written once as JPEG files (``--disk-n``, default all 60,000) in a
``<class>/<image>`` folder, trained with ``data.in_memory: false`` (decoding and per-image
augmentation in data-loader workers, ``data.workers``), printed beside the in-memory figure::

    python benchmarks/step_overhead.py --disk --no-eval --disk-dir /tmp/fmnist_jpeg
"""

# ruff: noqa: E402 - the environment is set before torch is imported
from __future__ import annotations

import os

from paws.cli import quiet_idle_threads

quiet_idle_threads()  # as the paws command does: idle OpenMP threads sleep

import argparse
import contextlib
import copy
import csv
import io
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from paws import progress, runtime
from paws.config import Config, load_config
from paws.config.adapt import fit_to_data
from paws.data import Datasets, ImageSet, load_datasets, step_batches
from paws.method.optim import set_lr
from paws.models import Architecture, build_network
from paws.pretrain.stages import build_run
from paws.pretrain.step import train_step
from paws.pretrain.train import train

SYNTHETIC = {"fashion_mnist": (1, 28, 60000, 10000, 10), "cifar10": (3, 32, 50000, 10000, 10)}


def synthetic_datasets(cfg: Config) -> Datasets:
    """Random uint8 images shaped like the config's dataset (no download, no disk)."""
    channels, size, n_train, n_test, classes = SYNTHETIC.get(
        cfg.data.dataset, (3, max(32, cfg.views.large_size), 50000, 10000, 10)
    )
    rng = np.random.default_rng(0)

    def images(n: int, labelled: bool) -> ImageSet:
        y = rng.integers(0, classes, n) if labelled else -np.ones(n, dtype=np.int64)
        x = torch.from_numpy(rng.integers(0, 256, (n, channels, size, size), dtype=np.uint8))
        return ImageSet(labels=y, names=[str(i) for i in range(n)], images=x)

    per_class = cfg.data.labels_per_class or 10
    labelled = images(max(classes * per_class, cfg.support.classes * 64), True)
    labelled.labels = np.arange(len(labelled)) % classes
    mean, std = (0.5,) * channels, (0.25,) * channels
    names = [str(c) for c in range(classes)]
    unlabelled, test = images(n_train, False), images(n_test, True)
    return Datasets(unlabelled, labelled, test, names, channels, mean, std)


def jpeg_folder(root: Path, n: int, per_class: int = 10) -> Path:
    """The first ``n`` Fashion-MNIST training images as ``root/.../all/<class>/<i>.jpg``
    (quality 90) and the first ``per_class`` of each class again under ``labeled/``, written
    once; returns the folder holding ``all`` and ``labeled``."""
    from PIL import Image

    from paws.data.builtin import FASHION_MNIST_CLASSES, load_fashion_mnist

    folder = root / f"fashion_mnist_jpeg_{n}"
    done = folder / ".complete"
    if not done.exists():
        train, _ = load_fashion_mnist(None)
        counts: dict[int, int] = {}
        for i in range(n):
            label = int(train.labels[i])
            name = FASHION_MNIST_CLASSES[label].replace("/", "-")
            im = Image.fromarray(train.images[i, 0].numpy(), mode="L")
            parts = ["all"] + (["labeled"] if counts.get(label, 0) < per_class else [])
            counts[label] = counts.get(label, 0) + 1
            for part in parts:
                (folder / part / name).mkdir(parents=True, exist_ok=True)
                im.save(folder / part / name / f"{i:05d}.jpg", quality=90)
        done.write_text("")
    return folder


def disk_config(args: argparse.Namespace, folder: Path) -> Config:
    """The config of ``args`` training from ``folder`` on disk (:func:`jpeg_folder`)."""
    overrides = [
        *args.overrides,
        "data.dataset=folder",
        f"data.labeled={folder / 'labeled'}",
        f"data.unlabeled={folder / 'all'}",
        "data.in_memory=false",
        *args.disk_set,
    ]
    return load_config(args.config, overrides)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------------------------
# Training step.


def measure_step(cfg: Config, data: Datasets, steps: int) -> dict[str, list[float]]:
    """Per-step seconds of the full step and of the bare encoder, measured in turns.

    The full step is what ``paws.pretrain.train.train`` does each step, on a run made by
    ``paws.pretrain.stages.build_run``: draw and augment the batch (``step_batches``), set the
    learning rate, ``train_step`` (forward, PAWS loss, backward, LARS) and read the loss. The
    bare step runs a copy of the same model on the same views with a trivial loss. Alternating
    the two step by step keeps a shared machine's changing load out of their ratio. The first
    step (warm-up) is dropped.
    """
    device = runtime.setup(cfg)
    run = build_run(cfg, Path(tempfile.gettempdir()), data, device)  # writes nothing
    model, optimizer = run.model, run.optimizer
    bare = copy.deepcopy(model)
    batches = step_batches(data, cfg, run.unl, run.sup, range(steps + 1), device)
    out: dict[str, list[float]] = {"full": [], "bare": [], "wait": []}
    for step in range(steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        batch = next(batches)
        set_lr(optimizer, run.schedule(step))
        monitor = cfg.run.monitor_every > 0 and step % cfg.run.monitor_every == 0
        train_step(
            model,
            optimizer,
            batch,
            run.labels,
            cfg.loss,
            run.ropaws,
            run.scaler,
            run.dtype,
            monitor,
        ).read()
        _sync(device)
        full = time.perf_counter() - t0

        t0 = time.perf_counter()
        bare.zero_grad(set_to_none=True)
        with runtime.autocast(device.type, run.dtype):
            h, z = bare([batch.supports, *batch.views])
        (h.float().mean() + z.float().mean()).backward()
        _sync(device)
        if step:
            out["full"].append(full)
            out["bare"].append(time.perf_counter() - t0)
            out["wait"].append(batch.wait / full)
    return out


def train_images_per_s(cfg: Config, data: Datasets, steps: int) -> float:
    """Images/s of ``paws.pretrain.train.train`` itself, from its metrics.csv (first step
    dropped)."""
    run = replace(
        cfg,
        optim=replace(cfg.optim, steps=steps + 1),
        run=replace(cfg.run, log_every=1, checkpoint_every=10**9, eval_every=0),
    )
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stderr(io.StringIO()):
        train(run, Path(out) / "run", data=replace(data, test=None))
        with open(Path(out) / "run" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))[1:]
    return _median([float(r["images_per_s"]) for r in rows])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarise_step(cfg: Config, m: dict[str, list[float]]) -> dict[str, float]:
    """Medians: images/s of both, their ratio (median of the per-step ratios), data wait."""
    n = cfg.optim.batch_size
    ratios = [f / b for f, b in zip(m["full"], m["bare"])]
    return {
        "steps": len(ratios),
        "step_s": _median(m["full"]),
        "bare_s": _median(m["bare"]),
        "step_images_per_s": n / _median(m["full"]),
        "bare_images_per_s": n / _median(m["bare"]),
        "ratio": _median(ratios),
        "ratio_q1": _quantile(ratios, 0.25),
        "ratio_q3": _quantile(ratios, 0.75),
        "data_wait_fraction": _median(m["wait"]),
    }


def _quantile(xs: list[float], q: float) -> float:
    return float(np.quantile(xs, q)) if xs else float("nan")


# --------------------------------------------------------------------------------------------
# PAWS-NN evaluation, each measurement in a fresh process for its peak memory.


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> int:
    """Current resident set size in bytes, after restarting the peak count from here
    (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def _peak_rss_bytes() -> int:
    return _status_kb("VmHWM") * 1024


def _eval_child(kind: str, cfg: Config, supports: int, queries: int, synthetic: bool, q) -> None:
    from paws.after.evaluate import paws_nn
    from paws.method.snn import snn_classify

    device = runtime.setup(cfg)
    torch.manual_seed(0)
    if kind == "embeddings":
        dim = cfg.model.proj_out if cfg.eval.features == "head" else None
        if dim is None:
            dim = build_network(Architecture.from_config(cfg, 1)).encoder.num_features
        s = torch.randn(supports, dim, device=device)
        x = torch.randn(queries, dim, device=device)
        y = torch.randint(0, 10, (supports,), device=device)
        run = lambda: snn_classify(x, s, y, 10, cfg.eval.tau, cfg.eval.chunk_size)  # noqa: E731
        info = {"dim": dim}
    else:
        data = synthetic_datasets(cfg) if synthetic else load_datasets(cfg)
        pool = data.unlabeled.images if data.unlabeled.in_memory else None
        if pool is None:
            raise SystemExit("the full PAWS-NN path needs an in-memory dataset (or --synthetic)")
        idx = torch.arange(supports) % len(pool)
        labelled = ImageSet(
            labels=np.arange(supports) % len(data.classes),
            names=[str(i) for i in range(supports)],
            images=pool[idx],
        )
        test = data.test
        qidx = torch.arange(queries) % len(test)
        test = ImageSet(
            labels=test.labels[qidx.numpy()],
            names=[str(i) for i in range(queries)],
            images=test.images[qidx],
        )
        model = build_network(Architecture.from_config(cfg, data.channels)).to(device)
        data = replace(data, labeled=labelled, test=test)
        run = lambda: paws_nn(model, data, cfg, device)  # noqa: E731
        info = {"dim": None}
    # Warm up on a small problem first: libraries load kernels and workspaces lazily, and
    # their memory is not the evaluation's.
    _warm_up(kind, cfg, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = _reset_peak_rss()
    t0 = time.perf_counter()
    run()
    _sync(device)
    seconds = time.perf_counter() - t0
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
        what = "GPU memory allocated"
    else:
        peak = _peak_rss_bytes() - before
        what = "resident set size"
    q.put({**info, "seconds": seconds, "peak_extra_mb": peak / 2**20, "memory": what})


def _warm_up(kind: str, cfg: Config, device: torch.device) -> None:
    from paws.method.snn import snn_classify

    x = torch.randn(64, 8, device=device)
    snn_classify(x, x, torch.arange(64, device=device) % 4, 4)
    if kind == "full":
        with torch.no_grad():
            channels = SYNTHETIC.get(cfg.data.dataset, (3,))[0]
            m = build_network(Architecture.from_config(cfg, channels)).to(device).eval()
            size = cfg.views.large_size
            m.embed(torch.randn(8, channels, size, size, device=device))


def measure_eval(
    kind: str, cfg: Config, supports: int, queries: int, synthetic: bool
) -> dict[str, float]:
    """Run one PAWS-NN measurement in a fresh process; time, queries/s and peak memory."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_eval_child, args=(kind, cfg, supports, queries, synthetic, q))
    p.start()
    result = q.get()
    p.join()
    result["queries_per_s"] = queries / result["seconds"]
    return result


def disk_step(args: argparse.Namespace, in_memory: dict[str, float]) -> dict[str, float]:
    """The step trained from JPEGs on disk, printed beside the in-memory one."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = jpeg_folder(Path(args.disk_dir or tmp), args.disk_n)
        cfg = disk_config(args, folder)
        data = load_datasets(cfg)
        cfg = fit_to_data(cfg, len(data.unlabeled), data.labeled.labels)  # as paws train does
        from paws.data.loaders import default_workers

        workers = default_workers(cfg.data.workers)
        print(f"from disk: {data.summary()}, {workers} data-loader workers", flush=True)
        step = summarise_step(cfg, measure_step(cfg, data, args.steps))
    print(
        f"from disk        {step['step_images_per_s']:8.1f} images/s, ratio "
        f"{step['ratio']:.3f} (quartiles {step['ratio_q1']:.3f}..{step['ratio_q3']:.3f}), "
        f"data wait {100 * step['data_wait_fraction']:.1f} % | in memory: ratio "
        f"{in_memory['ratio']:.3f}, data wait {100 * in_memory['data_wait_fraction']:.1f} %",
        flush=True,
    )
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config or recipe (default: Fashion-MNIST)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    parser.add_argument("--steps", type=int, default=20, help="measured steps (after 1 warm-up)")
    parser.add_argument(
        "--train-check",
        type=int,
        default=0,
        metavar="N",
        help="also run paws.pretrain.train.train for N steps and print its images/s",
    )
    parser.add_argument("--synthetic", action="store_true", help="random images, no dataset")
    parser.add_argument("--disk", action="store_true", help="also train from JPEGs on disk")
    parser.add_argument("--disk-n", type=int, default=60000, help="JPEGs written for --disk")
    parser.add_argument("--disk-dir", help="where --disk writes them (default: a temp folder)")
    parser.add_argument(
        "--disk-set", action="append", default=[], metavar="K=V", help="--disk's run only"
    )
    parser.add_argument("--no-eval", action="store_true", help="skip PAWS-NN evaluation")
    parser.add_argument("--no-eval-full", action="store_true", help="skip the full PAWS-NN path")
    parser.add_argument("--no-step", action="store_true", help="skip the training step")
    parser.add_argument("--supports", type=int, default=60000)
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    progress.set_quiet(True)

    cfg = load_config(args.config, args.overrides)
    device = runtime.setup(cfg)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"config: {args.config or 'default (Fashion-MNIST)'} {' '.join(args.overrides)}\n"
        f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {load:.1f}",
        flush=True,
    )
    results: dict[str, object] = {"device": str(device), "threads": torch.get_num_threads()}
    if not args.no_step:
        data = synthetic_datasets(cfg) if args.synthetic else load_datasets(cfg)
        cfg = fit_to_data(cfg, len(data.unlabeled), data.labeled.labels)  # as paws train does
        print(f"training step: global batch {cfg.optim.batch_size}, {data.summary()}", flush=True)
        step = summarise_step(cfg, measure_step(cfg, data, args.steps))
        results["step"] = step
        print(
            f"full PAWS step   {step['step_images_per_s']:8.1f} images/s "
            f"({step['step_s']:.3f} s/step, data included)\n"
            f"bare encoder     {step['bare_images_per_s']:8.1f} images/s "
            f"({step['bare_s']:.3f} s/step, forward + backward on the same views)\n"
            f"ratio            {step['ratio']:8.3f} (step / bare, median of {step['steps']} "
            f"steps; quartiles {step['ratio_q1']:.3f}..{step['ratio_q3']:.3f})\n"
            f"data wait        {100 * step['data_wait_fraction']:7.1f} % of step time",
            flush=True,
        )
        if args.disk:
            results["disk"] = disk_step(args, step)
        if args.train_check:
            ips = train_images_per_s(cfg, data, args.train_check)
            results["train_images_per_s"] = ips
            print(f"paws.pretrain.train.train {ips:8.1f} images/s (its metrics.csv, cross-check)")
    if not args.no_eval:
        kinds = ["embeddings"] + ([] if args.no_eval_full else ["full"])
        for kind in kinds:
            r = measure_eval(kind, cfg, args.supports, args.queries, args.synthetic)
            results[f"eval_{kind}"] = r
            what = (
                f"snn_classify on random {r['dim']}-d embeddings"
                if kind == "embeddings"
                else "full PAWS-NN (embed images + snn_classify)"
            )
            print(
                f"PAWS-NN {args.supports} supports x {args.queries} queries, {what}: "
                f"{r['seconds']:.2f} s, {r['queries_per_s']:.0f} queries/s, "
                f"peak {r['memory']} +{r['peak_extra_mb']:.0f} MiB",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
