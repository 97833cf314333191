"""The report's figures, each a function of run records returning a PNG (or None).

Plots use matplotlib's object API (no pyplot, so no global backend is switched) and render with
Agg. matplotlib is the optional ``report`` extra: :func:`require` says how to install it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from paws.errors import UserError
from paws.rundir import RunRecord

__all__ = [
    "INSTALL",
    "STYLE",
    "WIDTH",
    "require",
    "png",
    "CURVE_PANELS",
    "plot_curves",
    "plot_accuracy",
    "plot_last_eval",
    "plot_tsne",
    "plot_grid",
]

INSTALL = "pip install 'paws-ssl[report]'"
STYLE = {
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
WIDTH = 13.0  # inches; every section is drawn this wide so the PNG stacks cleanly
_DPI = 100


def require() -> tuple[Any, Any]:
    """matplotlib's Figure class and rc_context, or a one-line error saying how to install."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError as e:
        raise UserError(f"paws report needs matplotlib: {INSTALL}") from e
    return Figure, matplotlib.rc_context


# The training-curve panels: (title, metrics.csv column, scale, axis label).
CURVE_PANELS = [
    ("(a) PAWS cross-entropy loss", "cross_entropy", 1.0, "cross-entropy (nats)"),
    ("(b) Instance discrimination (NT-Xent)", "instance_loss", 1.0, "loss (nats)"),
    ("(b) Support classification (SuNCEt)", "support_loss", 1.0, "loss (nats)"),
    ("(c) Mean target confidence", "target_confidence", 100.0, "confidence (%)"),
    ("Learning rate", "lr", 1.0, "learning rate"),
    ("ME-MAX: entropy of mean prediction", "mean_entropy", 1.0, "entropy (nats)"),
]


def _colour(i: int) -> str:
    return f"C{i % 10}"


def png(fig: Any) -> bytes:
    """A figure as PNG bytes, on white."""
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
    Figure, rc = require()
    with rc(STYLE):
        fig = Figure(figsize=(WIDTH, 7.6), layout="constrained")
        axes = fig.subplots(2, 3).ravel()
        for ax, (title, key, scale, ylabel) in zip(axes, CURVE_PANELS):
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
        return png(fig)


def _legend_handle(colour: str, label: str, marker: str | None = "o", linestyle: str = "-"):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=colour, marker=marker, linestyle=linestyle, label=label)


def plot_accuracy(runs: Sequence[RunRecord]) -> bytes | None:
    """PAWS-NN top-1 accuracy at each evaluation, the supervised-only baseline as a line."""
    have = [r for r in runs if len(r.evals.get("step", []))]
    if not have and not any(r.baseline for r in runs):
        return None
    Figure, rc = require()
    with rc(STYLE):
        fig = Figure(figsize=(WIDTH, 4.6), layout="constrained")
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
        return png(fig)


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
    Figure, rc = require()
    panels = len(have) + 1
    rows = math.ceil(panels / 2)
    with rc(STYLE):
        fig = Figure(figsize=(WIDTH, 7.0 * rows), layout="constrained")
        axes = np.atleast_1d(fig.subplots(rows, 2)).ravel()
        for ax, (_, r) in zip(axes, have):
            image = _confusion_panel(ax, r)
            fig.colorbar(image, ax=ax, label="% of the true class", shrink=0.75, pad=0.02)
        _per_class_panel(axes[len(have)], same, classes)
        for ax in axes[panels:]:
            ax.set_visible(False)
        return png(fig)


def _class_colours(k: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"]
    return [cmap(i if k <= 20 else i / max(1, k - 1)) for i in range(k)]


def plot_tsne(
    items: Sequence[tuple[int, RunRecord, np.ndarray, np.ndarray]], classes: list[str]
) -> bytes:
    """t-SNE maps, one panel a run: ``items`` holds (colour index, run, (N, 2) map, (N,) labels)."""
    Figure, rc = require()
    cols = min(len(items), 2)
    rows = math.ceil(len(items) / cols)
    k = len(classes)
    colours = _class_colours(k)
    with rc(STYLE):
        # One map: about square beside its legend, rather than stretched over the page width.
        size = (9.5, 7.0) if cols == 1 else (WIDTH, 5.6 * rows)
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
        return png(fig)


def plot_grid(
    run: RunRecord,
    pictures: Sequence[np.ndarray],
    labels: Sequence[int],
    predictions: Sequence[int],
    classes: list[str],
    columns: int = 8,
) -> bytes:
    """Test images with predicted and true labels; mistakes in red with a red frame."""
    Figure, rc = require()
    n = len(pictures)
    rows = math.ceil(n / columns)
    with rc(STYLE):
        fig = Figure(figsize=(WIDTH, 2.05 * rows + 0.7), layout="constrained")
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
        return png(fig)
