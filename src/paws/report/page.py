"""``paws report``: pictures of one or several runs, as a PNG and a self-contained HTML page.

A run directory already holds everything a picture needs except the embeddings: metrics.csv
(losses, monitor-only metrics of the paper's Fig. 4, learning rate), evals.csv (PAWS-NN accuracy
at each evaluation), predictions.json (the last evaluation), baseline.json (the supervised-only
baseline, when ``paws baseline --out RUN_DIR`` was run) and the final model. The t-SNE map and
the image grid re-load the test images the run's config names. Several runs are drawn overlaid,
one colour each, to compare configs; runs that are the rounds of a labelling loop (one started
from another with ``paws train --init``) also get a table of the rounds
(:mod:`paws.report.rounds`). The figures are :mod:`paws.report.figures`; this module lays them
out as sections of one page.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from paws.errors import UserError
from paws.files import check_out_dir, write_atomic, write_with
from paws.progress import info
from paws.report.figures import (
    STYLE,
    WIDTH,
    plot_accuracy,
    plot_curves,
    plot_last_eval,
    plot_tsne,
    png,
    require,
)
from paws.report.rounds import ROUND_COLUMNS, labelling_rounds, plot_rounds, round_rows
from paws.report.test_set import prediction_grid, test_view, tsne_map
from paws.rundir import RunRecord, load_run

__all__ = ["Section", "build_report"]


@dataclass
class Section:
    """One part of the report: a heading, a PNG and a caption (or a note why it is missing),
    and optionally a table (its header and rows)."""

    title: str
    png: bytes | None = None
    caption: str = ""
    note: str = ""
    alt: str = ""
    table: tuple[list[str], list[list[str]]] | None = None


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Directory names, lengthened with parent folders until they differ."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{n} ({i + 1})" for i, n in enumerate(names)]


def _top1_text(top1: float | None, summary: dict[str, Any] | None) -> str:
    """``79.20%``, or ``79.20% (tighten.pt; final.pt 78.10%)``: the model the run chose and
    the others it had."""
    if top1 is None:
        return "–"
    summary = summary or {}
    others = {
        f: c for f, c in (summary.get("candidates") or {}).items() if f != summary.get("model")
    }
    if not others and summary.get("pretrained"):  # runs written before the choice
        others = {"final.pt": summary["pretrained"]}
    if not others:
        return f"{top1:.2f}%"
    beside = ", ".join(f"{f} {c['top1']:.2f}%" for f, c in others.items())
    return f"{top1:.2f}% ({summary.get('model', 'tighten.pt')}; {beside})"


def _summary_rows(runs: Sequence[RunRecord]) -> list[list[str]]:
    rows = []
    for r in runs:
        step = r.metrics.get("step")
        steps = int(step[-1]) if step is not None and len(step) else None
        spe = r.steps_per_epoch
        top1 = r.summary.get("top1") if r.summary else None
        top5 = r.summary.get("top5") if r.summary else None
        balanced = r.summary.get("balanced_top1") if r.summary else None
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
                "–" if balanced is None else f"{balanced:.2f}%",
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
    "balanced top-1",
    "PAWS-NN top-5",
    "supervised only top-1",
]


def _summary_png(rows: list[list[str]]) -> bytes:
    """The summary table drawn as an image, for the top of report.png."""
    Figure, rc = require()
    with rc(STYLE):
        fig = Figure(figsize=(WIDTH, 1.2 + 0.45 * len(rows)), layout="constrained")
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
        return png(fig)


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
    write_with(path, lambda f: sheet.save(f, format="PNG", optimize=True))


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
        if s.table is not None:
            head, body = s.table
            parts.append(
                "<table><thead><tr>"
                + "".join(f"<th>{e(h)}</th>" for h in head)
                + "</tr></thead><tbody>"
                + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</tbody></table>"
            )
        if s.png is not None:
            data = base64.b64encode(s.png).decode("ascii")
            parts.append(f'<img alt="{e(s.alt or s.title)}" src="data:image/png;base64,{data}">')
        if s.note:
            parts.append(f'<p class="note">{e(s.note)}</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _round_sections(runs: Sequence[RunRecord]) -> list[Section]:
    """The rounds of a labelling loop side by side, when the runs are such rounds."""
    ordered = labelling_rounds(runs)
    if ordered is None:
        return []
    rows = round_rows(ordered)
    return [
        Section(
            "Labelling rounds",
            plot_rounds(rows),
            caption="Runs that started from another run's weights (paws train --init, "
            "init.json), in round order: each round's labelled images and classes, PAWS-NN "
            "top-1 and the minutes from config.yaml to eval.json.",
            table=(ROUND_COLUMNS, rows),
        )
    ]


def _metric_sections(runs: Sequence[RunRecord]) -> list[Section]:
    """Sections drawn from the run directories' files alone."""
    curves = plot_curves(runs)
    accuracy = plot_accuracy(runs)
    no_base = [r.name for r in runs if not r.baseline]
    if accuracy is None:
        accuracy_note = "No evaluations (evals.csv) in these runs."
    elif no_base:
        accuracy_note = (
            f"No baseline.json for {', '.join(no_base)}: run "
            "'paws baseline --out RUN_DIR' to add the supervised-only line."
        )
    else:
        accuracy_note = ""
    last = plot_last_eval(runs)
    return [
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
        ),
        Section(
            "PAWS-NN accuracy",
            accuracy,
            caption="Top-1 accuracy of soft nearest neighbours against the labelled images at "
            "each evaluation (run.eval_every); dashed: the supervised-only baseline trained "
            "on the same labelled images (paws baseline --out RUN_DIR).",
            note=accuracy_note,
        ),
        Section(
            "Last evaluation: confusion matrix and per-class accuracy",
            last,
            caption="Each row of a confusion matrix is a true class; cells give the percentage "
            "of its test images predicted as each class. Bars: the share of each class's test "
            "images classified correctly.",
            note=""
            if last
            else "No predictions.json (written at the end of training when there is a test set).",
        ),
    ]


def _test_image_sections(
    runs: Sequence[RunRecord], tsne_points: int, grid_images: int, seed: int, data: Any
) -> list[Section]:
    """The t-SNE map and the prediction grids, which re-load each run's model and test set."""
    tsne_items, grids, notes_tsne, notes_grid = [], [], [], []
    cache: dict[str, Any] = {}
    classes = next((r.classes for r in runs if r.classes), None)
    for i, r in enumerate(runs):
        try:
            cfg, model, d = test_view(r, data, cache)
        except UserError as err:
            reason = f"{r.name}: {err}"
            notes_tsne.append(reason)
            notes_grid.append(reason)
            info(f"report: no test images for {reason}")
            continue
        if tsne_points > 0:
            xy, y = tsne_map(r, cfg, model, d, tsne_points, seed)
            tsne_items.append((i, r, xy, y))
            classes = classes or list(d.classes)
        if grid_images > 0:
            grid = prediction_grid(r, d, grid_images, seed)
            if isinstance(grid, str):
                notes_grid.append(f"{r.name}: {grid}")
            else:
                grids.append(grid)
    sections = []
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
    title = "Test images: predicted and true labels"
    for n, (r, picture) in enumerate(grids):
        caption = "Predictions of the last evaluation (predictions.json); mistakes in red."
        name = f" ({r.name})" if len(runs) > 1 else ""
        sections.append(Section(title + name, picture, caption=caption if n == 0 else ""))
    if grid_images > 0 and notes_grid:
        sections.append(Section(title, note="; ".join(notes_grid)))
    return sections


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
    require()
    if not run_dirs:
        raise UserError("give at least one run directory")
    paths = [Path(p).expanduser() for p in run_dirs]
    runs = [load_run(p, n) for p, n in zip(paths, _unique_names(paths))]
    out = check_out_dir(Path(out_dir).expanduser() if out_dir else paths[0])
    out.mkdir(parents=True, exist_ok=True)
    sections = _round_sections(runs) + _metric_sections(runs)
    if tsne_points > 0 or grid_images > 0:
        sections += _test_image_sections(runs, tsne_points, grid_images, seed, data)
    rows = _summary_rows(runs)
    html_path, png_path = out / "report.html", out / "report.png"
    write_atomic(html_path, _html(runs, rows, sections))
    _stack([_summary_png(rows)] + [s.png for s in sections if s.png is not None], png_path)
    return {"png": png_path, "html": html_path}
