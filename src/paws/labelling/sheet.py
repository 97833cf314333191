"""A contact sheet: a self-contained HTML page of image thumbnails in groups, to label from.

``paws suggest --html`` writes one: the images to label next grouped by the class PAWS-NN
suggests, each with its rank, file name, suggested class, confidence and the reason it was
chosen. The thumbnails are inline PNGs (base64), so the page is one file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from paws.files import write_atomic
from paws.labelling.records import Pool, Suggestion, Suggestions

__all__ = ["SheetItem", "contact_sheet", "write_sheet"]


@dataclass
class SheetItem:
    """One image of the sheet.

    Attributes:
        group: the heading it is shown under (a suggested class).
        png: the thumbnail as PNG bytes.
        name: its file name or path, as the CSV names it.
        lines: further captions (suggested class and confidence, reason).
        rank: its place in the suggestion list (1 is the first).
    """

    group: str
    png: bytes
    name: str
    lines: list[str] = field(default_factory=list)
    rank: int = 0


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em;
       color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ddd; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 136px; font-size: 0.75em; }
figure img { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated;
             background: #f4f4f4; border: 1px solid #ccc; display: block; }
figcaption { word-break: break-all; } .rank { color: #888; } .name { font-weight: 600; }
"""


def contact_sheet(items: Sequence[SheetItem], title: str, csv_name: str | None = None) -> str:
    """The HTML page: one section per group (largest first), thumbnails in rank order.

    Args:
        items: the images.
        title: the page's heading.
        csv_name: the CSV to fill in, named in the instructions.
    """
    e = html.escape
    groups: dict[str, list[SheetItem]] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    where = f" in <code>{e(csv_name)}</code>" if csv_name else ""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f"<p>Fill in the <code>label</code> column{where} for these images, then train with "
        "<code>--set data.labels_file=FILE</code>. Numbers are ranks in the file.</p>",
    ]
    for group, members in sorted(groups.items(), key=lambda g: (-len(g[1]), g[0])):
        parts.append(f"<h2>{e(group)} ({len(members)})</h2><div class='grid'>")
        for it in sorted(members, key=lambda m: m.rank):
            data = base64.b64encode(it.png).decode("ascii")
            caption = "".join(f"<br>{e(line)}" for line in it.lines)
            parts.append(
                f"<figure><img alt='{e(it.name)}' src='data:image/png;base64,{data}'>"
                f"<figcaption><span class='rank'>#{it.rank}</span> "
                f"<span class='name'>{e(it.name)}</span>{caption}</figcaption></figure>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _thumbnail(pool: Pool, i: int, size: int = 96) -> bytes:
    """A PNG of candidate ``i``, its longer side at most ``size`` pixels."""
    im = pool.picture(i)
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _heading(p: Suggestion) -> str:
    if p.group_size is not None:
        return f"{p.suggested}: {p.group_size} images like these match no labelled class"
    return p.suggested or "no suggestion yet (cold start)"


def write_sheet(s: Suggestions, out: str | Path, csv_name: str | None = None) -> Path:
    """Write a self-contained HTML contact sheet of the suggestions: thumbnails grouped by
    suggested class, each with its file name, confidence and reason."""
    out = Path(out).expanduser()
    items = [
        SheetItem(
            group=_heading(p),
            png=_thumbnail(s.pool, p.index),
            name=s.pool.path(p.index, out.parent),
            lines=[
                *([f"{p.suggested} {p.confidence:.2f}"] if p.confidence is not None else []),
                p.reason,
            ],
            rank=rank + 1,
        )
        for rank, p in enumerate(s.picks)
    ]
    title = f"{len(items)} images to label next ({s.strategy}, {s.features})"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, contact_sheet(items, title, csv_name))
    return out
