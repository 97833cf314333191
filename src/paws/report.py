"""``paws report``: pictures of one or several runs, as a PNG and a self-contained HTML page.

A run directory already holds everything a picture needs except the embeddings: metrics.csv
(losses, monitor-only metrics of the paper's Fig. 4, learning rate), evals.csv (PAWS-NN accuracy
at each evaluation), predictions.json (the last evaluation), baseline.json (the supervised-only
baseline, when ``paws baseline --out RUN_DIR`` was run) and final.pt. The t-SNE map and the
image grid re-load the test images the run's config names. Several runs are drawn overlaid, one
colour each, to compare configs.

Plots use matplotlib's object API (no pyplot, so no global backend is switched) and render with
Agg; t-SNE comes from scikit-learn. Both are the optional ``report`` extra.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paws.errors import UserError
from paws.progress import info

__all__ = [
    "RunRecord",
    "Section",
    "load_run",
    "build_report",
    "plot_curves",
    "plot_accuracy",
    "plot_last_eval",
    "plot_tsne",
    "plot_grid",
]

_INSTALL = "pip install 'paws-ssl[report]'"
_STYLE = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "legend.fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
_WIDTH = 13.0  # inches; every section is drawn this wide so the PNG stacks cleanly
_DPI = 100


@dataclass
class RunRecord:
    """What a run directory holds, read once.

    Attributes:
        name: label in legends (the directory name, made unique among the runs shown).
        path: the run directory.
        config: the resolved config (config.yaml) as a dict.
        metrics: metrics.csv columns as float arrays (NaN where a row has no value).
        evals: evals.csv columns (step, top1, top5), possibly empty.
        predictions: predictions.json (classes, labels, predictions, confusion) or None.
        baseline: baseline.json (supervised-only top1, top5, ...) or None.
        summary: eval.json (final PAWS-NN result) or None.
    """

    name: str
    path: Path
    config: dict[str, Any]
    metrics: dict[str, np.ndarray]
    evals: dict[str, np.ndarray]
    predictions: dict[str, Any] | None
    baseline: dict[str, Any] | None
    summary: dict[str, Any] | None

    @property
    def classes(self) -> list[str] | None:
        return list(self.predictions["classes"]) if self.predictions else None

    @property
    def steps_per_epoch(self) -> float | None:
        """Steps in one epoch over the unlabelled set, from metrics.csv's step and epoch."""
        s, e = self.metrics.get("step"), self.metrics.get("epoch")
        if s is None or e is None or not len(s) or not np.isfinite(e[-1]) or e[-1] <= 0:
            return None
        return float(s[-1] / e[-1])


@dataclass
class Section:
    """One part of the report: a heading, a PNG and a caption (or a note why it is missing)."""

    title: str
    png: bytes | None = None
    caption: str = ""
    note: str = ""
    alt: str = ""


def _require() -> tuple[Any, Any]:
    """matplotlib's Figure class and rc_context, or a one-line error saying how to install."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as e:
        raise UserError(f"paws report needs matplotlib: {_INSTALL}") from e
    return Figure, matplotlib.rc_context


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a numeric CSV file as float arrays; empty cells become NaN."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    header, body = rows[0], rows[1:]

    def num(v: str) -> float:
        try:
            return float(v)
        except ValueError:
            return math.nan

    return {
        k: np.array([num(r[i]) if i < len(r) else math.nan for r in body], dtype=np.float64)
        for i, k in enumerate(header)
    }


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from e


def load_run(path: str | Path, name: str | None = None) -> RunRecord:
    """Read a run directory written by ``paws train``.

    Args:
        path: the run directory.
        name: legend label (default: the directory name).

    Returns:
        The run's records.
    """
    import yaml

    run = Path(path).expanduser()
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    if not (run / "metrics.csv").is_file() and not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a run directory (no metrics.csv or config.yaml)")
    config = {}
    if (run / "config.yaml").is_file():
        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    return RunRecord(
        name=name or run.resolve().name,
        path=run,
        config=config,
        metrics=_read_csv(run / "metrics.csv"),
        evals=_read_csv(run / "evals.csv"),
        predictions=_read_json(run / "predictions.json"),
        baseline=_read_json(run / "baseline.json"),
        summary=_read_json(run / "eval.json"),
    )


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Directory names, lengthened with parent folders until they differ."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{n} ({i + 1})" for i, n in enumerate(names)]


# --------------------------------------------------------------------------------------------
# Drawing.


def _colour(i: int) -> str:
    return f"C{i % 10}"


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, facecolor="white")
    return buf.getvalue()


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
    """Centred running mean over ``n`` points (shorter at the ends), for noisy curves."""
    kernel = np.ones(n)
    num = np.convolve(y, kernel, mode="same")
    den = np.convolve(np.ones_like(y), kernel, mode="same")
    return num / den


def _series(run: RunRecord, key: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a metrics column where it has values."""
    if key not in run.metrics or "step" not in run.metrics:
        return np.array([]), np.array([])
    x, y = run.metrics["step"], run.metrics[key] * scale
    ok = np.isfinite(y) & np.isfinite(x)
    return x[ok], y[ok]


def _epoch_axis(ax: Any, runs: Sequence[RunRecord]) -> None:
    """A secondary 'epoch' axis on top when every run has the same epoch length."""
    per = {round(r.steps_per_epoch, 6) for r in runs if r.steps_per_epoch}
    if len(per) != 1:
        return
    from matplotlib.ticker import MaxNLocator

    spe = per.pop()
    top = ax.secondary_xaxis("top", functions=(lambda s: s / spe, lambda e: e * spe))
    top.set_xlabel("epoch", fontsize=10)
    top.tick_params(labelsize=9)
    top.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))


def _line(ax: Any, x: np.ndarray, y: np.ndarray, colour: str, label: str) -> None:
    """A metric curve: raw points faint and a running mean on top when they are many."""
    if len(x) > 60:
        ax.plot(x, y, color=colour, alpha=0.25, linewidth=0.8)
        ax.plot(x, _smooth(y, max(3, len(x) // 30)), color=colour, linewidth=1.8, label=label)
    else:
        ax.plot(x, y, color=colour, linewidth=1.6, marker="o", markersize=3, label=label)


def plot_curves(runs: Sequence[RunRecord]) -> bytes | None:
    """Training curves in the style of Fig. 4: PAWS loss, Fig. 4b losses, target confidence,
    learning rate and ME-MAX. Returns the PNG, or None when no run has metrics."""
    if not any(len(_series(r, "loss")[0]) for r in runs):
        return None
    Figure, rc = _require()
    panels = [
        ("(a) PAWS cross-entropy loss", "cross_entropy", 1.0, "cross-entropy (nats)"),
        ("(b) Instance discrimination (NT-Xent)", "instance_loss", 1.0, "loss (nats)"),
        ("(b) Support classification (SuNCEt)", "support_loss", 1.0, "loss (nats)"),
        ("(c) Mean target confidence", "target_confidence", 100.0, "confidence (%)"),
        ("Learning rate", "lr", 1.0, "learning rate"),
        ("ME-MAX: entropy of mean prediction", "mean_entropy", 1.0, "entropy (nats)"),
    ]
    with rc(_STYLE):
        fig = Figure(figsize=(_WIDTH, 7.6), layout="constrained")
        axes = fig.subplots(2, 3).ravel()
        for ax, (title, key, scale, ylabel) in zip(axes, panels):
            drawn = False
            for i, r in enumerate(runs):
                x, y = _series(r, key, scale)
                if key == "mean_entropy" and not len(x):
                    x, y = _series(r, "me_max", -1.0)  # the ME-MAX term is minus this entropy
                if len(x):
                    _line(ax, x, y, _colour(i), r.name)
                    drawn = True
            if key == "mean_entropy":
                ks = {len(r.classes) for r in runs if r.classes}
                if not ks:
                    ks = {int(r.config.get("support", {}).get("classes", 0)) for r in runs} - {0}
                # Entropy never exceeds log K: room above that line keeps its label off the curves.
                for k in sorted(ks):
                    ax.axhline(math.log(k), color="0.4", linestyle="--", linewidth=1)
                    ax.annotate(
                        f"maximum: log {k} = {math.log(k):.2f}",
                        (1.0, math.log(k)),
                        xycoords=("axes fraction", "data"),
                        xytext=(-4, 3),
                        textcoords="offset points",
                        ha="right",
                        va="bottom",
                        fontsize=9,
                        color="0.3",
                    )
                if ks:
                    lo, _ = ax.get_ylim()
                    top = math.log(max(ks))
                    ax.set_ylim(lo, top + 0.2 * max(top - lo, 0.05))
            if not drawn:
                ax.text(
                    0.5,
                    0.5,
                    "not logged\n(run.monitor_every = 0)",
                    transform=ax.transAxes,
                    ha="center",
                    va="center",
                    color="0.4",
                )
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            if drawn:
                _epoch_axis(ax, runs)
        handles = [_legend_handle(_colour(i), r.name, marker=None) for i, r in enumerate(runs)]
        fig.legend(
            handles=handles,
            loc="outside upper center",
            ncol=min(len(runs), 4),
            frameon=False,
            title="run" if len(runs) == 1 else "runs",
        )
        return _png(fig)


def _legend_handle(colour: str, label: str, marker: str | None = "o", linestyle: str = "-"):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour, marker=marker, linestyle=linestyle, label=label)


def plot_accuracy(runs: Sequence[RunRecord]) -> bytes | None:
    """PAWS-NN top-1 accuracy at each evaluation, the supervised-only baseline as a line."""
    have = [r for r in runs if len(r.evals.get("step", []))]
    if not have and not any(r.baseline for r in runs):
        return None
    Figure, rc = _require()
    with rc(_STYLE):
        fig = Figure(figsize=(_WIDTH, 4.6), layout="constrained")
        ax = fig.subplots()
        xmax, ends, values = 1.0, [], []
        for i, r in enumerate(runs):
            c = _colour(i)
            if len(r.evals.get("step", [])):
                x, y = r.evals["step"], r.evals["top1"]
                ax.plot(x, y, color=c, marker="o", linewidth=1.8, label=f"{r.name}: PAWS-NN")
                ends.append((float(x[-1]), float(y[-1]), c))
                values += [float(v) for v in y if np.isfinite(v)]
                xmax = max(xmax, float(np.nanmax(x)))
            if r.baseline and "top1" in r.baseline:
                values.append(float(r.baseline["top1"]))
                ax.axhline(
                    r.baseline["top1"],
                    color=c,
                    linestyle="--",
                    linewidth=1.4,
                    label=f"{r.name}: supervised only ({r.baseline['top1']:.1f}%)",
                )
        # Zoom on the values (in steps of 10%) so close runs stay apart; chance when in view.
        lo = max(0.0, 10 * math.floor((min(values) - 5) / 10))
        hi = min(100.0, 10 * math.ceil((max(values) + 5) / 10))
        for r in runs:
            if r.classes and 100.0 / len(r.classes) >= lo:
                chance = 100.0 / len(r.classes)
                label = f"chance ({chance:.0f}%)"
                ax.axhline(chance, color="0.5", linestyle=":", linewidth=1.2, label=label)
                break
        _label_ends(ax, ends, gap=0.045 * (hi - lo))
        ax.set_xlim(0, xmax * 1.08)
        ax.set_ylim(lo, hi)
        ax.set_title("PAWS-NN test accuracy per evaluation")
        ax.set_xlabel("step")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        _epoch_axis(ax, runs)
        return _png(fig)


def _label_ends(ax: Any, ends: list[tuple[float, float, str]], gap: float) -> None:
    """Write each curve's last accuracy next to its last point, spread so labels never touch."""
    placed: list[tuple[float, float]] = []
    for x, y, colour in sorted(ends, key=lambda e: e[1]):
        ty = y
        for px, py in placed:
            if abs(px - x) <= 0.05 * max(x, px, 1.0) and ty - py < gap:
                ty = py + gap
        placed.append((x, ty))
        ax.annotate(
            f"{y:.1f}%",
            (x, ty),
            xytext=(7, 0),
            textcoords="offset points",
            va="center",
            fontsize=9,
            color=colour,
            bbox={"boxstyle": "square,pad=0.15", "facecolor": "white", "edgecolor": "none"},
        )


def _short(name: str, n: int = 14) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def _confusion_panel(ax: Any, run: RunRecord) -> Any:
    """Row-normalised confusion matrix of a run's last evaluation; returns the image."""
    cm = np.asarray(run.predictions["confusion"], dtype=np.float64)
    classes = run.predictions["classes"]
    pct = 100.0 * cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(pct, cmap="Blues", vmin=0, vmax=100)
    ax.grid(False)
    k = len(classes)
    if k <= 30:
        ax.set_xticks(range(k), [_short(c) for c in classes], rotation=45, ha="right")
        ax.set_yticks(range(k), [_short(c) for c in classes])
    if k <= 12:
        for t in range(k):
            for p in range(k):
                if cm[t, p]:
                    ax.text(
                        p,
                        t,
                        f"{pct[t, p]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=10 if k <= 10 else 8,
                        color="white" if pct[t, p] > 55 else "black",
                    )
    acc = 100.0 * np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"{run.name}: top-1 {acc:.1f}% ({int(cm.sum())} test images)")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return image


def _per_class_panel(ax: Any, have: Sequence[tuple[int, RunRecord]], classes: list[str]) -> None:
    """Per-class accuracy of each run's last evaluation, as grouped horizontal bars."""
    k = len(classes)
    width = 0.8 / len(have)
    for j, (i, r) in enumerate(have):
        cm = np.asarray(r.predictions["confusion"], dtype=np.float64)
        acc = 100.0 * np.diag(cm) / np.maximum(cm.sum(axis=1), 1)
        pos = np.arange(k) - 0.4 + width * (j + 0.5)
        ax.barh(pos, acc, height=width, color=_colour(i), label=r.name)
        if k * len(have) <= 40:
            for y, a in zip(pos, acc):
                ax.text(a + 1.0, y, f"{a:.0f}", va="center", fontsize=9, color="0.2")
    ax.set_yticks(range(k), [_short(c, 20) for c in classes] if k <= 60 else [""] * k)
    ax.set_ylim(k - 0.5, -0.5)
    ax.set_xlim(0, 112)
    ax.set_xlabel("accuracy on the class's test images (%)")
    ax.set_ylabel("true class")
    ax.set_title("Per-class PAWS-NN accuracy")
    ax.grid(axis="y", visible=False)
    if len(have) > 1:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(len(have), 3))


def plot_last_eval(runs: Sequence[RunRecord]) -> bytes | None:
    """Confusion matrix of each run's last evaluation and the per-class accuracy of all runs
    (those with the first run's classes), two panels a row."""
    have = [(i, r) for i, r in enumerate(runs) if r.predictions]
    if not have:
        return None
    classes = list(have[0][1].predictions["classes"])
    same = [(i, r) for i, r in have if list(r.predictions["classes"]) == classes]
    Figure, rc = _require()
    panels = len(have) + 1
    rows = math.ceil(panels / 2)
    with rc(_STYLE):
        fig = Figure(figsize=(_WIDTH, 7.0 * rows), layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, 2)).ravel()
        for ax, (_, r) in zip(axes, have):
            image = _confusion_panel(ax, r)
            fig.colorbar(image, ax=ax, label="% of the true class", shrink=0.75, pad=0.02)
        _per_class_panel(axes[len(have)], same, classes)
        for ax in axes[panels:]:
            ax.set_visible(False)
        return _png(fig)


def _class_colours(k: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"]
    return [cmap(i if k <= 20 else i / max(1, k - 1)) for i in range(k)]


def plot_tsne(
    items: Sequence[tuple[int, RunRecord, np.ndarray, np.ndarray]], classes: list[str]
) -> bytes:
    """t-SNE maps, one panel a run: ``items`` holds (colour index, run, (N, 2) map, (N,) labels)."""
    Figure, rc = _require()
    cols = min(len(items), 2)
    rows = math.ceil(len(items) / cols)
    k = len(classes)
    colours = _class_colours(k)
    with rc(_STYLE):
        # One map: about square beside its legend, rather than stretched over the page width.
        size = (9.5, 7.0) if cols == 1 else (_WIDTH, 5.6 * rows)
        fig = Figure(figsize=size, layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
        for ax, (_, r, xy, y) in zip(axes, items):
            for c in range(k):
                m = y == c
                if m.any():
                    ax.scatter(xy[m, 0], xy[m, 1], s=6, color=colours[c], alpha=0.8, linewidths=0)
            ax.set_title(f"{r.name}: {len(y)} test images")
            ax.set_xlabel("t-SNE dimension 1")
            ax.set_ylabel("t-SNE dimension 2")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            ax.set_aspect("equal", adjustable="datalim")
        for ax in axes[len(items) :]:
            ax.set_visible(False)
        if k <= 20:
            handles = [_legend_handle(colours[c], classes[c], linestyle="") for c in range(k)]
            fig.legend(
                handles=handles,
                loc="outside right upper",
                title="true class",
                markerscale=1.3,
                frameon=False,
            )
        return _png(fig)


def _display_images(images: Any, index: np.ndarray, channels: int) -> list[np.ndarray]:
    """Test images at ``index`` as (H, W) or (H, W, 3) uint8 arrays for display."""
    from paws.data import read_image

    out = []
    for i in index:
        if images.images is not None:
            a = images.images[int(i)].numpy()
            a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
        else:
            a = np.asarray(read_image(images.files[int(i)], channels))
        out.append(a)
    return out


def plot_grid(
    run: RunRecord,
    pictures: Sequence[np.ndarray],
    labels: Sequence[int],
    predictions: Sequence[int],
    classes: list[str],
    columns: int = 8,
) -> bytes:
    """Test images with predicted and true labels; mistakes in red with a red frame."""
    Figure, rc = _require()
    n = len(pictures)
    rows = math.ceil(n / columns)
    with rc(_STYLE):
        fig = Figure(figsize=(_WIDTH, 2.05 * rows + 0.7), layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
        wrong = 0
        for ax, pic, t, p in zip(axes, pictures, labels, predictions):
            ok = int(t) == int(p)
            wrong += not ok
            ax.imshow(pic, cmap="gray" if pic.ndim == 2 else None, vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.grid(False)
            colour = "black" if ok else "#c00000"
            ax.set_title(
                f"pred: {_short(classes[int(p)])}\ntrue: {_short(classes[int(t)])}",
                fontsize=9,
                color=colour,
                linespacing=1.2,
            )
            for side in ax.spines.values():
                side.set_visible(not ok)
                side.set_color(colour)
                side.set_linewidth(3)
        for ax in axes[n:]:
            ax.set_visible(False)
        fig.suptitle(
            f"{run.name}: {n} random test images, {wrong} wrong "
            "(red: predicted class ≠ true class)",
            fontsize=12,
        )
        return _png(fig)


# --------------------------------------------------------------------------------------------
# Embeddings and images from the run's test set.


def _checkpoint(run: RunRecord) -> Path | None:
    for name in ("tighten.pt", "final.pt", "last.pt"):  # the model of eval.json first
        if (run.path / name).is_file():
            return run.path / name
    return None


def _test_view(run: RunRecord, data: Any, cache: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(config, model, datasets) of a run, loading each distinct dataset once."""
    import torch

    from paws.checkpoint import restore_model
    from paws.data import load_datasets

    ckpt = _checkpoint(run)
    if ckpt is None:
        raise UserError("no final.pt or last.pt in the run directory")
    cfg, model, _ = restore_model(ckpt)
    if data is None:
        key = json.dumps(run.config.get("data", {}), sort_keys=True) + str(cfg.views.large_size)
        if key not in cache:
            cache[key] = load_datasets(cfg)
        data = cache[key]
    if data.test is None:
        raise UserError("the run's dataset has no test set")
    device = torch.device(
        "cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu"
    )
    return cfg, model.to(device), data


def _tsne(
    run: RunRecord, cfg: Any, model: Any, data: Any, points: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE of up to ``points`` test embeddings (the run's PAWS-NN features)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError as e:
        raise UserError(f"paws report needs scikit-learn for the t-SNE map: {_INSTALL}") from e
    from paws.evaluate import embed_images

    n = len(data.test)
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(n, size=min(points, n), replace=False))
    device = next(model.parameters()).device
    subset = data.test.subset(index)
    emb = embed_images(
        model,
        subset,
        cfg,
        data.channels,
        data.mean,
        data.std,
        device,
        progress=True,
        desc=f"embed {run.name}",
    )
    emb = emb.cpu().numpy().astype(np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    perplexity = float(min(30.0, max(2.0, (len(index) - 1) / 3.0)))
    xy = TSNE(
        n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed
    ).fit_transform(emb)
    return xy, subset.labels


# --------------------------------------------------------------------------------------------
# The report.


def _top1_text(top1: float | None, summary: dict[str, Any] | None) -> str:
    """``79.20%``, or ``79.20% (tightened; 78.10% before)`` for a run that tightened."""
    if top1 is None:
        return "–"
    before = (summary or {}).get("pretrained")
    return f"{top1:.2f}% (tightened; {before['top1']:.2f}% before)" if before else f"{top1:.2f}%"


def _summary_rows(runs: Sequence[RunRecord]) -> list[list[str]]:
    rows = []
    for r in runs:
        step = r.metrics.get("step")
        steps = int(step[-1]) if step is not None and len(step) else None
        spe = r.steps_per_epoch
        top1 = r.summary.get("top1") if r.summary else None
        top5 = r.summary.get("top5") if r.summary else None
        if top1 is None and len(r.evals.get("top1", [])):
            top1 = float(r.evals["top1"][-1])
        base = r.baseline.get("top1") if r.baseline else None
        model = r.config.get("model", {})
        data = r.config.get("data", {})
        labelled = r.summary.get("num_support") if r.summary else None
        if labelled is None:
            per = data.get("labels_per_class")
            labelled = f"{per} per class" if per else data.get("label_fraction") or "?"
        length = "?" if steps is None else str(steps)
        if steps is not None and spe:
            length = f"{steps} ({steps / spe:.2f} epochs)"
        rows.append(
            [
                r.name,
                str(data.get("dataset", "?")),
                str(labelled),
                f"{model.get('encoder', '?')} (width {model.get('width') or 'default'})",
                length,
                _top1_text(top1, r.summary),
                "–" if top5 is None else f"{top5:.2f}%",
                "–" if base is None else f"{base:.2f}%",
            ]
        )
    return rows


_SUMMARY_HEAD = [
    "run",
    "dataset",
    "labelled images",
    "encoder",
    "steps",
    "PAWS-NN top-1",
    "PAWS-NN top-5",
    "supervised only top-1",
]


def _summary_png(rows: list[list[str]]) -> bytes:
    """The summary table drawn as an image, for the top of report.png."""
    Figure, rc = _require()
    with rc(_STYLE):
        fig = Figure(figsize=(_WIDTH, 1.2 + 0.45 * len(rows)), layout="constrained")
        ax = fig.subplots()
        ax.axis("off")
        # Columns as wide as their longest text, scaled to fill exactly the figure's width.
        chars = [max(len(c) for c in col) + 2 for col in zip(_SUMMARY_HEAD, *rows)]
        widths = [c / sum(chars) for c in chars]
        table = ax.table(
            cellText=rows, colLabels=_SUMMARY_HEAD, colWidths=widths, loc="center", cellLoc="left"
        )
        table.auto_set_font_size(False)
        table.set_fontsize(11 if sum(chars) < 150 else 9)
        table.scale(1.0, 1.8)
        for (row, _), cell in table.get_celld().items():
            cell.set_edgecolor("0.8")
            if row == 0:
                cell.set_text_props(weight="bold")
                cell.set_facecolor("0.93")
        fig.suptitle("PAWS report", fontsize=15, weight="bold")
        return _png(fig)


def _stack(pngs: Sequence[bytes], path: Path) -> None:
    """Stack PNG images vertically on white, with a gap between them."""
    from PIL import Image

    images = [Image.open(io.BytesIO(p)).convert("RGB") for p in pngs]
    width = max(im.width for im in images)
    gap = 24
    height = sum(im.height for im in images) + gap * (len(images) + 1)
    sheet = Image.new("RGB", (width, height), "white")
    y = gap
    for im in images:
        sheet.paste(im, ((width - im.width) // 2, y))
        y += im.height + gap
    sheet.save(path, format="PNG", optimize=True)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1360px; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; font-size: 0.95em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: left; }
th { background: #f0f0f0; }
img { max-width: 100%; height: auto; display: block; }
p.caption { color: #444; font-size: 0.95em; }
p.note { color: #8a4b00; background: #fff6e5; padding: 0.4em 0.7em; }
code { background: #f4f4f4; padding: 0 0.2em; }
"""


def _html(runs: Sequence[RunRecord], rows: list[list[str]], sections: list[Section]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>PAWS report: {e(', '.join(r.name for r in runs))}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>PAWS report</h1>",
        "<p>Runs: " + ", ".join(f"<code>{e(str(r.path))}</code>" for r in runs) + "</p>",
        "<h2>Summary</h2>",
        "<table><thead><tr>"
        + "".join(f"<th>{e(h)}</th>" for h in _SUMMARY_HEAD)
        + "</tr></thead><tbody>",
    ]
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>")
    parts.append("</tbody></table>")
    for s in sections:
        parts.append(f"<h2>{e(s.title)}</h2>")
        if s.caption:
            parts.append(f'<p class="caption">{e(s.caption)}</p>')
        if s.png is not None:
            data = base64.b64encode(s.png).decode("ascii")
            parts.append(f'<img alt="{e(s.alt or s.title)}" src="data:image/png;base64,{data}">')
        if s.note:
            parts.append(f'<p class="note">{e(s.note)}</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    tsne_points: int = 2000,
    grid_images: int = 32,
    seed: int = 0,
    data: Any = None,
) -> dict[str, Path]:
    """Draw the report of one or several runs.

    Args:
        run_dirs: run directories written by ``paws train``; several are overlaid.
        out_dir: where report.png and report.html go (default: the first run directory).
        tsne_points: test images embedded for the t-SNE map (0: no map).
        grid_images: test images in the prediction grid (0: no grid).
        seed: seed of the image samples and of t-SNE.
        data: preloaded :class:`paws.data.Datasets` to use instead of the runs' configs.

    Returns:
        ``{"png": path, "html": path}``.
    """
    _require()
    if not run_dirs:
        raise UserError("give at least one run directory")
    paths = [Path(p).expanduser() for p in run_dirs]
    names = _unique_names(paths)
    runs = [load_run(p, n) for p, n in zip(paths, names)]
    out = Path(out_dir).expanduser() if out_dir else paths[0]
    out.mkdir(parents=True, exist_ok=True)

    sections: list[Section] = []
    curves = plot_curves(runs)
    sections.append(
        Section(
            "Training curves",
            curves,
            caption="As in the paper's Fig. 4: (a) the PAWS cross-entropy between anchor "
            "and target views; (b) instance-discrimination (NT-Xent between the two large "
            "views) and support-classification (SuNCEt) losses, computed on each step's own "
            "batch for monitoring only, with no gradient; (c) the mean confidence of the "
            "sharpened target's top class. Faint lines are raw values, solid lines their "
            "running mean when points are many.",
            note="" if curves else "No metrics.csv rows to draw.",
        )
    )
    accuracy = plot_accuracy(runs)
    no_base = [r.name for r in runs if not r.baseline]
    sections.append(
        Section(
            "PAWS-NN accuracy",
            accuracy,
            caption="Top-1 accuracy of soft nearest neighbours against the labelled images at "
            "each evaluation (run.eval_every); dashed: the supervised-only baseline trained "
            "on the same labelled images (paws baseline --out RUN_DIR).",
            note=(
                "No evaluations (evals.csv) in these runs."
                if accuracy is None
                else f"No baseline.json for {', '.join(no_base)}: run "
                "'paws baseline --out RUN_DIR' to add the supervised-only line."
                if no_base
                else ""
            ),
        )
    )
    last = plot_last_eval(runs)
    sections.append(
        Section(
            "Last evaluation: confusion matrix and per-class accuracy",
            last,
            caption="Each row of a confusion matrix is a true class; cells give the percentage "
            "of its test images predicted as each class. Bars: the share of each class's test "
            "images classified correctly.",
            note=""
            if last
            else "No predictions.json (written at the end of training when there is a test set).",
        )
    )

    tsne_items, grids, notes_tsne, notes_grid = [], [], [], []
    cache: dict[str, Any] = {}
    classes = next((r.classes for r in runs if r.classes), None)
    if tsne_points > 0 or grid_images > 0:
        for i, r in enumerate(runs):
            try:
                cfg, model, d = _test_view(r, data, cache)
            except UserError as err:
                reason = f"{r.name}: {err}"
                notes_tsne.append(reason)
                notes_grid.append(reason)
                info(f"report: no test images for {reason}")
                continue
            if tsne_points > 0:
                xy, y = _tsne(r, cfg, model, d, tsne_points, seed)
                tsne_items.append((i, r, xy, y))
                classes = classes or list(d.classes)
            if grid_images > 0:
                grid = _grid(r, d, grid_images, seed)
                if isinstance(grid, str):
                    notes_grid.append(f"{r.name}: {grid}")
                else:
                    grids.append(grid)
    if tsne_points > 0:
        sections.append(
            Section(
                "t-SNE map of test embeddings",
                plot_tsne(tsne_items, classes) if tsne_items and classes else None,
                caption="A 2-D t-SNE (scikit-learn) of the embeddings PAWS-NN classifies, "
                "for a random sample of test images, coloured by true class. Well-separated "
                "colours mean the classes form separate clusters.",
                note="; ".join(notes_tsne),
            )
        )
    if grid_images > 0:
        for n, (r, png) in enumerate(grids):
            sections.append(
                Section(
                    "Test images: predicted and true labels"
                    + (f" ({r.name})" if len(runs) > 1 else ""),
                    png,
                    caption="Predictions of the last evaluation (predictions.json); "
                    "mistakes in red."
                    if n == 0
                    else "",
                )
            )
        if notes_grid:
            sections.append(
                Section("Test images: predicted and true labels", note="; ".join(notes_grid))
            )

    rows = _summary_rows(runs)
    html_path, png_path = out / "report.html", out / "report.png"
    html_path.write_text(_html(runs, rows, sections), encoding="utf-8")
    _stack([_summary_png(rows)] + [s.png for s in sections if s.png is not None], png_path)
    return {"png": png_path, "html": html_path}


def _grid(run: RunRecord, data: Any, count: int, seed: int) -> tuple[RunRecord, bytes] | str:
    """The image grid of a run, or why it cannot be drawn."""
    p = run.predictions
    if not p:
        return "no predictions.json"
    if len(p["labels"]) != len(data.test) or list(p["classes"]) != list(data.classes):
        return "predictions.json does not match the test set the config names"
    rng = np.random.default_rng([seed, 1])
    index = rng.choice(len(data.test), size=min(count, len(data.test)), replace=False)
    labels = np.asarray(p["labels"])[index]
    if not np.array_equal(labels, data.test.labels[index]):
        return "predictions.json's labels differ from the test set's"
    pictures = _display_images(data.test, index, data.channels)
    preds = np.asarray(p["predictions"])[index]
    return run, plot_grid(run, pictures, labels, preds, list(p["classes"]))
