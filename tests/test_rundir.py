"""A run directory (rundir/): which model it means, its metric columns, rebuilding a saved model,
an empty config.yaml refused, every damaged run file read back in one line, and its lock: one
paws train at a time, a stale lock ignored."""

from __future__ import annotations

import os

import pytest
import torch
from tiny import (
    Cases,
    copy_run,
    error_line,
    logged_steps,
    run_cli,
    snapshot,
)

from paws import rundir
from paws.rundir import checkpoint
from paws.rundir.lock import LOCK, RunLock


def test_a_run_directory_names_its_final_model_or_the_pretrained_one(tmp_path):
    (tmp_path / "last.pt").touch()
    assert rundir.model_file(tmp_path) == tmp_path / "last.pt"
    (tmp_path / "tighten.pt").touch()  # the run ended by tightening
    assert rundir.model_file(tmp_path) == tmp_path / "tighten.pt"
    assert rundir.model_file(tmp_path, pretrained=True) == tmp_path / "last.pt"
    assert rundir.model_file(tmp_path / "final.pt") == tmp_path / "final.pt"


def test_metric_rows_have_every_column_and_refuse_unknown_names():
    row = rundir.metrics_row({"step": 3, "loss": -1.5, "support_loss": 0.2})
    assert list(row) == list(rundir.METRIC_COLUMNS)
    assert row["step"] == 3 and row["support_loss"] == 0.2 and row["epoch"] == ""
    with pytest.raises(ValueError, match="supprt_loss"):
        rundir.metrics_row({"step": 3, "supprt_loss": 0.2})


def test_the_report_draws_only_columns_that_training_writes():
    pytest.importorskip("matplotlib")
    from paws.report.figures import CURVE_PANELS

    assert {key for _, key, _, _ in CURVE_PANELS} <= set(rundir.METRIC_COLUMNS)


def test_a_checkpoint_without_an_architecture_record_is_rebuilt_from_its_config(
    shared_run, tmp_path
):
    _, run_dir = shared_run
    state = checkpoint.load(run_dir / "last.pt")
    old = {k: v for k, v in state.items() if k not in ("architecture", "channels")}
    checkpoint.save(old, tmp_path / "old.pt")
    new, legacy = rundir.restore(run_dir / "last.pt"), rundir.restore(tmp_path / "old.pt")
    assert legacy.arch == new.arch
    x = torch.rand(3, new.arch.in_channels, 16, 16)
    torch.testing.assert_close(legacy.net.embed(x), new.net.embed(x))


def test_library_calls_leave_the_process_settings_alone(shared_run, tmp_path):
    from paws.after.tighten import tighten_checkpoint

    _, run_dir = shared_run
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    rng = torch.get_rng_state()
    tighten_checkpoint(
        run_dir, ["tighten.steps=2", "run.threads=1", "run.deterministic=true"], tmp_path
    )
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
    assert torch.equal(torch.get_rng_state(), rng)


def test_an_empty_config_yaml_refuses_to_resume(made, tmp_path, capsys):
    run = copy_run(made, tmp_path / "run")
    (run / "config.yaml").write_bytes(b"")
    before = snapshot(run)
    line = error_line(run_cli(["--quiet", "train", "--resume", str(run)], capsys, None)[2])
    assert line == (
        f"cannot resume {run}: its config.yaml is empty (a write that did not finish?); give "
        "the run's config with --config FILE"
    )
    assert snapshot(run) == before


# Damage a run file can take that its readers must refuse: bytes that are not the UTF-8 paws
# writes, binary data, and JSON or CSV of another shape.
def _run_file_damage(name: str, data: bytes):
    yield "utf-16", data.decode().encode("utf-16")
    yield "latin-1", "é".encode("latin-1") + data
    yield "NUL bytes", data[:5] + b"\x00" + data[5:]
    if name.endswith(".json"):
        for kind in (b"[1, 2]", b'"text"', b"3"):
            yield f"a JSON {kind.decode()}", kind
        yield "a value of another kind", b'{"top1": "high", "classes": 3, "confusion": [["a"]]}'
    if name.endswith(".csv"):
        yield "a header without step", b"steps,top\n1,2\n"
        yield "an unbalanced quote", b'step,"top1\n1,2\n'


# Which command reads each file: the report reads them all, a resume its logs and config, the
# choice of model every command that loads a run.
_READERS = {
    "metrics.csv": ("report", "resume"),
    "evals.csv": ("report", "resume"),
    "eval.json": ("report",),
    "predictions.json": ("report",),
    "choice.json": ("eval",),
    "config.yaml": ("report", "resume"),
}


def test_every_damaged_run_file_ends_in_one_line_naming_it(made, tmp_path, capsys):
    cases, n = Cases(capsys), 0
    for name, readers in _READERS.items():
        assert (made["run"] / name).is_file(), name
        for damage, data in _run_file_damage(name, (made["run"] / name).read_bytes()):
            if name == "config.yaml" and damage.startswith(("a header", "an unbalanced")):
                continue
            for reader in readers:
                n += 1
                run = copy_run(made, tmp_path / f"run{n}")
                (run / name).write_bytes(data)
                argv = {
                    "report": ["report", str(run), "--out", str(tmp_path / f"report{n}")],
                    "resume": ["train", "--resume", str(run)],
                    "eval": ["eval", str(run)],
                }[reader]
                cases.refused(f"{reader}: {name} {damage}", argv, run, expect=name)
    cases.check()


def test_a_second_run_into_a_running_directory_is_refused(made, tmp_path, capsys):
    run = copy_run(made, tmp_path / "run")
    before = snapshot(run)
    with RunLock(run):  # as a paws train still running
        holder = (run / LOCK).read_text().strip()
        assert holder.startswith(f"process {os.getpid()} on ")
        for argv in (
            ["train", "--resume", str(run)],
            ["train", "--config", str(made["config"]), "--out", str(run)],
        ):
            line = error_line(run_cli(["--quiet", *argv], capsys, None)[2])
            assert line == (
                f"{run} is in use by {holder}, which is still training into it; wait for it "
                "to end or stop it, or choose another --out"
            )
    assert snapshot(run) == before


def test_a_stale_lock_does_not_block_and_a_finished_run_resumed_logs_no_row_twice(
    made, tmp_path, capsys
):
    run = copy_run(made, tmp_path / "run")
    (run / LOCK).write_text("process 999999999 on a machine that was switched off\n")
    metrics, evals = logged_steps(run / "metrics.csv"), logged_steps(run / "evals.csv")
    code, _, err = run_cli(["--quiet", "train", "--resume", str(run)], capsys, None)
    assert code == 0, err
    assert not (run / LOCK).exists()
    assert logged_steps(run / "metrics.csv") == metrics == [1, 2, 3, 4]
    assert logged_steps(run / "evals.csv") == evals == [4]
