"""The rounds of a labelling loop, side by side: ``paws report r1 r2 r3``.

A run started from another's weights (``paws train --init``) says so in its ``init.json``;
runs given together where one started from another are the rounds of a loop, ordered by how
many rounds lie before each (the order given breaks ties). Each round's row: its labelled
images and classes (the run's labelled set, re-read from its config), PAWS-NN top-1 and the
wall-clock minutes of its training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from paws.config import from_dict
from paws.data.sources import load_datasets
from paws.errors import UserError
from paws.progress import info
from paws.report.figures import STYLE, WIDTH, png, require
from paws.rundir import RunRecord

__all__ = ["ROUND_COLUMNS", "labelling_rounds", "round_rows", "plot_rounds"]

ROUND_COLUMNS = [
    "round",
    "run",
    "labelled images",
    "labelled classes",
    "PAWS-NN top-1",
    "minutes",
    "started from",
]


def labelling_rounds(runs: Sequence[RunRecord]) -> list[RunRecord] | None:
    """The runs in round order, or None when none of them started from another one."""
    by_path = {r.path.resolve(): r for r in runs}

    def parent(r: RunRecord) -> RunRecord | None:
        if not r.init or not r.init.get("from"):
            return None
        return by_path.get(Path(r.init["from"]).resolve())

    if not any(parent(r) for r in runs):
        return None

    def depth(r: RunRecord) -> int:
        seen, d, p = {id(r)}, 0, parent(r)
        while p is not None and id(p) not in seen:
            seen.add(id(p))
            d, p = d + 1, parent(p)
        return d

    order = {id(r): i for i, r in enumerate(runs)}
    return sorted(runs, key=lambda r: (depth(r), order[id(r)]))


def _labelled(run: RunRecord) -> tuple[str, str]:
    """(labelled images, labelled classes) of a run, from its labelled set."""
    try:
        data = load_datasets(from_dict(run.config))
    except (UserError, TypeError, ValueError) as e:
        info(f"report: cannot re-read the labelled set of {run.name}: {e}")
        images = (run.summary or {}).get("num_support")
        return ("?" if images is None else str(images)), "?"
    return str(len(data.labeled)), str(len(np.unique(data.labeled.labels)))


def round_rows(ordered: Sequence[RunRecord]) -> list[list[str]]:
    """One row of :data:`ROUND_COLUMNS` a round."""
    names = {r.path.resolve(): r.name for r in ordered}
    rows = []
    for i, r in enumerate(ordered):
        images, classes = _labelled(r)
        top1 = (r.summary or {}).get("top1")
        came = Path(r.init["from"]).resolve() if r.init and r.init.get("from") else None
        rows.append(
            [
                str(i + 1),
                r.name,
                images,
                classes,
                "–" if top1 is None else f"{top1:.2f}%",
                "–" if r.minutes is None else f"{r.minutes:.1f}",
                "scratch" if came is None else names.get(came, str(came)),
            ]
        )
    return rows


def plot_rounds(rows: Sequence[Sequence[str]]) -> bytes | None:
    """PAWS-NN top-1 against labelled images, one point a round (each labelled with its
    round and minutes); None when no round has both numbers."""
    points = []
    for row in rows:
        try:
            points.append((int(row[2]), float(row[4].rstrip("%")), row[0], row[5]))
        except ValueError:
            continue
    if not points:
        return None
    Figure, rc = require()
    with rc(STYLE):
        fig = Figure(figsize=(WIDTH, 4.2), layout="constrained")
        ax = fig.subplots()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="C0")
        for x, y, name, minutes in points:
            ax.annotate(
                f"round {name} ({minutes} min)",
                (x, y),
                xytext=(6, -12),
                textcoords="offset points",
                fontsize=9,
            )
        ax.set_xlabel("labelled images")
        ax.set_ylabel("PAWS-NN top-1 (%)")
        ax.set_title("Labelling rounds")
        return png(fig)
