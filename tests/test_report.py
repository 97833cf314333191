"""``paws report``: a report built from tiny runs is a valid PNG and a self-contained HTML page."""

from __future__ import annotations

import base64
import io
import json
import shutil
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

import pytest
from tiny import (  # noqa: E402
    EVALUATED,
    error_line,
    run_paws,
    tiny_overrides,
    train_tiny,
    write_rows,
)

from paws.cli import main  # noqa: E402
from paws.config import load_config
from paws.report import build_report  # noqa: E402

SECTIONS = (
    "Summary",
    "Training curves",
    "PAWS-NN accuracy",
    "Last evaluation: confusion matrix and per-class accuracy",
    "t-SNE map of test embeddings",
    "Test images: predicted and true labels",
)


@pytest.fixture(scope="module")
def runs(labeled_and_test, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    a = train_tiny(root / "tau-0.1", tiny_overrides(labeled_and_test, *EVALUATED))
    changes = ["loss.tau=0.2", "run.seed=1"]
    b = train_tiny(root / "tau-0.2", tiny_overrides(labeled_and_test, *EVALUATED, *changes))
    (a / "baseline.json").write_text(json.dumps({"top1": 40.0, "top5": 100.0}))
    return a, b


class _Page(HTMLParser):
    """Headings, image sources and external references of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.images: list[str] = []
        self.external: list[str] = []
        self._in_heading = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("h1", "h2"):
            self._in_heading = True
            self.headings.append("")
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag in ("link", "script") and (a.get("href") or a.get("src")):
            self.external.append(a.get("href") or a.get("src") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "h2"):
            self._in_heading = False

    def handle_data(self, data: str) -> None:
        if self._in_heading:
            self.headings[-1] += data


def _check_png(data: bytes) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _check_html(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    assert not page.external, f"the page references external assets: {page.external}"
    for src in page.images:
        assert src.startswith("data:image/png;base64,"), src[:40]
        im = _check_png(base64.b64decode(src.split(",", 1)[1], validate=True))
        assert im.width >= 600 and im.height >= 100
    return page


def test_report_of_one_run(runs, tmp_path: Path) -> None:
    paths = build_report([runs[0]], tmp_path / "report", tsne_points=20, grid_images=8)
    assert paths["png"] == tmp_path / "report" / "report.png"
    sheet = _check_png(paths["png"].read_bytes())
    assert sheet.width >= 1000 and sheet.height > 2000
    page = _check_html(paths["html"])
    for title in SECTIONS:
        assert title in page.headings, (title, page.headings)
    # Curves, accuracy, last evaluation, t-SNE and the image grid.
    assert len(page.images) == 5
    text = paths["html"].read_text()
    assert "supervised only" in text.lower() and "40.00%" in text
    assert "No baseline.json" not in text


@pytest.mark.slow
def test_report_compares_two_runs_from_the_command_line(runs, tmp_path: Path) -> None:
    out = tmp_path / "compare"
    proc = run_paws(
        "--quiet",
        "report",
        *map(str, runs),
        "--out",
        str(out),
        "--tsne-points",
        "16",
        "--grid-images",
        "4",
    )
    assert proc.stderr == ""
    assert "report.html" in proc.stdout
    _check_png((out / "report.png").read_bytes())
    page = _check_html(out / "report.html")
    for title in SECTIONS[:-1]:
        assert title in page.headings
    grids = [h for h in page.headings if h.startswith("Test images")]
    assert grids == [f"Test images: predicted and true labels ({r.name})" for r in runs]
    text = (out / "report.html").read_text()
    # Both runs are named; only the first has a baseline.
    assert "tau-0.1" in text and "tau-0.2" in text
    assert "No baseline.json for tau-0.2" in text
    assert len(page.images) == 6


def test_report_without_plotting_libraries_says_how_to_install(runs, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    assert main(["report", str(runs[0])]) == 2
    assert "pip install 'paws-ssl[report]'" in error_line(capsys.readouterr().err)


def test_report_of_a_missing_run_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"paws: error: run directory not found: {tmp_path / 'nope'}\n"


def test_report_of_an_unfinished_run_says_what_is_missing(runs, tmp_path: Path) -> None:
    run = tmp_path / "unfinished"
    shutil.copytree(runs[1], run)
    for name in ("predictions.json", "eval.json", "evals.csv", "final.pt"):
        (run / name).unlink()
    paths = build_report([run], tsne_points=12, grid_images=4)
    assert paths["html"] == run / "report.html"
    page = _check_html(paths["html"])
    assert len(page.images) == 2  # curves and the t-SNE map (from last.pt)
    text = paths["html"].read_text()
    assert "No evaluations (evals.csv)" in text
    assert "unfinished: no predictions.json" in text
    _check_png(paths["png"].read_bytes())


@pytest.mark.slow
def test_report_shows_the_rounds_of_a_labelling_loop_in_order(pool, tmp_path):
    pytest.importorskip("matplotlib")
    from paws.pretrain.train import train
    from paws.report import build_report

    folders = {"unlabeled": pool["unlabeled"], "test": pool["test"]}
    rounds, labels = [], []
    for i, per_class in enumerate((1, 2, 4)):
        rows = [
            [f"unl/class{c}/class{c}_{j}.png", f"class{c}"]
            for c in range(3)
            for j in range(per_class)
        ]
        labels.append(write_rows(tmp_path / f"labels{i}.csv", ["path", "label"], rows))
        cfg = load_config(None, tiny_overrides(folders, f"data.labels_file={labels[-1]}"))
        train(cfg, tmp_path / f"r{i + 1}", init=rounds[-1] if rounds else None)
        rounds.append(tmp_path / f"r{i + 1}")
    # Given out of order, the report puts them in round order.
    paths = build_report([rounds[2], rounds[0], rounds[1]], tmp_path / "rep", 0, 0)
    page = paths["html"].read_text()
    assert "<h2>Labelling rounds</h2>" in page
    table = page[page.index("<h2>Labelling rounds</h2>") :]
    table = table[: table.index("</table>")]
    cells = [row.split("<td>")[1:] for row in table.split("<tr>")[2:]]
    values = [[c.split("</td>")[0] for c in row] for row in cells]
    assert [v[:4] for v in values] == [
        ["1", "r1", "3", "3"],
        ["2", "r2", "6", "3"],
        ["3", "r3", "12", "3"],
    ]
    assert [v[6] for v in values] == ["scratch", "r1", "r2"]
    assert all(v[4].endswith("%") and float(v[5]) >= 0 for v in values)
