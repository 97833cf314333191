"""Progress output: a bar on a terminal, plain lines in logs, nothing with --quiet."""

from __future__ import annotations

import io
import sys

import pytest
from tiny import run_paws, set_args, tiny_overrides

from paws.progress import Progress, info, set_quiet


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_with_eta_and_values_when_not_a_terminal(capsys, monkeypatch) -> None:
    bar = Progress(4, "train", every=0.0)
    bar.update(1, loss=0.123456, lr=0.3)
    bar.update(1, loss=0.5)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("train 1/4 (25%) eta ") and lines[0].endswith("loss=0.1235 lr=0.3")
    assert lines[1].startswith("train 2/4 (50%) eta ") and lines[1].endswith("loss=0.5")


def test_plain_lines_are_periodic(capsys, monkeypatch) -> None:
    bar = Progress(100, "embed", every=3600.0)
    for _ in range(100):
        bar.update(1)
    # The first update and the last are printed; the 98 between fall inside the period.
    assert len(capsys.readouterr().err.splitlines()) == 2


def test_terminal_gets_a_bar_and_messages_above_it(monkeypatch) -> None:
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = Progress(10, "train", initial=2)
    bar.update(3, loss=1.5, top1=42.0)
    info("step 5: PAWS-NN top-1 42.00%")
    bar.close()
    text = term.getvalue()
    assert "train:" in text and "5/10" in text and "loss=1.5" in text and "top1=42" in text
    assert "<" in text  # tqdm's elapsed<remaining
    assert "\nstep 5: PAWS-NN top-1 42.00%\n" in text.replace("\r", "\n")


def test_quiet_silences_progress_and_info(capsys) -> None:
    previous = set_quiet(True)
    try:
        bar = Progress(2, "train", every=0.0)
        bar.update(2, loss=1.0)
        bar.close()
        info("hello")
    finally:
        assert set_quiet(previous) is True
    assert capsys.readouterr().err == ""
    info("hello again")  # back on
    assert "hello again" in capsys.readouterr().err


@pytest.mark.slow
def test_quiet_flag_keeps_results_and_errors(labeled_and_test) -> None:
    sets = set_args(tiny_overrides(labeled_and_test, "optim.steps=3"))
    ok = run_paws("--quiet", "baseline", *sets, "--json")
    assert ok.stderr == ""
    assert '"top1"' in ok.stdout
    # Also accepted after the command; errors still show.
    bad = run_paws("baseline", *sets, "--set", "optim.steps=0", "--quiet", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "paws: error: optim.steps must be in [1, 100000000], got 0"


@pytest.mark.slow
def test_progress_lines_of_a_command_in_a_log(labeled_and_test) -> None:
    run = run_paws("baseline", *set_args(tiny_overrides(labeled_and_test, "optim.steps=3")))
    lines = run.stderr.splitlines()
    assert any(line.startswith("baseline 3/3 (100%) eta 0.0 min loss=") for line in lines)
    assert "supervised-only test accuracy" in run.stdout
