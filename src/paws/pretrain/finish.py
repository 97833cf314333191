"""The end of a run: the final checkpoint, the steps a run ends with, and which model it means.

After the last step, ``last.pt`` and ``final.pt`` hold the pre-trained model; tightening
(``tighten.after_training``, Appendix C) writes ``tighten.pt``. Then the run chooses, from its
labelled images alone (:mod:`paws.after.choose`), which of them it means, and writes
``choice.json``; ``eval.json`` and ``predictions.json`` are the chosen model's test results
(with every candidate's beside them in ``eval.json``), and ``paws eval``, ``predict``,
``export`` and ``paws.load`` given the run directory use the chosen model.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from paws import distributed, rundir
from paws.after.choose import Candidate, Choice, cross_validate, decide, write_choice
from paws.after.distill import distill, train_student
from paws.after.evaluate import accuracy, classifier_eval, classifier_probs, paws_nn
from paws.after.saved import Opened, save_step
from paws.after.tighten import tighten
from paws.data.images import ImageSet
from paws.data.sources import Datasets
from paws.errors import UserError
from paws.pretrain.stages import Run
from paws.progress import Progress, info, muted
from paws.rundir import checkpoint

__all__ = ["finish_run", "DEFAULT_ORDER"]

# The model a run means when its labels cannot tell (measured best across the benchmarks,
# benchmarks/RESULTS.md): the first of these the run has.
DEFAULT_ORDER = (rundir.TIGHTENED, rundir.FINAL)


def _tighten_after_training(run: Run, step: int) -> dict[str, Any] | None:
    """The last step of Appendix C's protocol when ``tighten.after_training``: SuNCEt on the
    labelled images (:func:`paws.after.tighten.tighten`, ``run.model`` changed in place),
    saved as ``tighten.pt`` in the run directory.

    Returns:
        The tightening report (PAWS-NN not yet filled in, ``seconds`` and ``checkpoint``
        added), or None when tightening is off, the run is label-free, or the labels do not
        allow it (fewer than 2 classes, or a class with a single image: said in a line).
    """
    if not run.cfg.tighten.after_training or run.label_free:
        return None
    start = time.time()
    try:
        report = tighten(run.cfg, run.model, run.data, run.device, evaluate=False)
    except UserError as e:
        info(f"not tightening the clusters after training: {e}")
        return None
    opened = Opened(run.cfg, run.model, run.arch, step, run.out, run.device, run.data, start)
    return save_step("tighten", run.model, run.arch, opened, report, rundir.TIGHTENED)


def _distill_after_training(
    run: Run, step: int, teacher: str, tests: dict[str, dict[str, Any]]
) -> bool:
    """The student (``distill.after_training``, :mod:`paws.after.distill`) of ``run.model``
    (the model ``teacher`` names), saved as ``distill.pt`` with ``distill.json``, its test
    results added to ``tests`` (which holds the teacher's); False when it is off. Under
    torchrun every process trains it, from rank 0's teacher; rank 0 tests and saves it."""
    if not run.cfg.distill.after_training:
        return False
    start = time.time()
    cfg, data, device = run.cfg, run.data, run.device
    _share_weights(run.model)
    report, student = distill(cfg, run.model, run.arch, data, device, evaluate=False, shared=True)
    if not distributed.is_main():
        return True
    if data.test is not None:
        tests[rundir.DISTILLED] = ev = classifier_eval(student, data, cfg, device)
        report["test"] = {k: ev[k] for k in ("top1", "top5", "balanced_top1", "num_query")}
        report["teacher_test"] = {"top1": tests[teacher]["top1"]}
    opened = Opened(cfg, student, run.arch, step, run.out, device, data, start)
    arch = run.arch.with_classifier(len(data.classes))
    save_step("distill", student, arch, opened, report, rundir.DISTILLED)
    report["teacher"] = teacher
    rundir.write_json(run.out / "distill.json", report)
    return True


def _share_weights(model: torch.nn.Module) -> None:
    """Every process's ``model`` takes rank 0's weights (its tightened model: only rank 0
    tightens); nothing in one process."""
    if not distributed.is_initialized():
        return
    state = {k: v.cpu() for k, v in model.state_dict().items()} if distributed.is_main() else None
    model.load_state_dict(distributed.broadcast_object(state))


def _candidates(run: Run, pretrained: torch.nn.Module, files: list[str]) -> list[Candidate]:
    """The models of the run, each rebuilt on part of the labels as :func:`cross_validate`
    asks (from a copy of the pre-trained weights, never touching the run's): the student's
    teacher on a fold is that fold's tightened model when the run has one."""
    cfg, device = run.cfg, run.device
    fold: dict[str, Any] = {}  # the last fold's tightened model, shared by its candidates

    def snn_top1(model: torch.nn.Module, train: Datasets, held: ImageSet) -> float:
        return float(paws_nn(model, train, cfg, device, queries=held)["top1"])

    def tightened_model(train: Datasets) -> torch.nn.Module:
        if fold.get("train") is not train:
            model = copy.deepcopy(pretrained)
            tighten(cfg, model, train, device, evaluate=False)
            fold.update(train=train, model=model.eval())
        return fold["model"]

    def student(train: Datasets, held: ImageSet) -> float:
        teacher = tightened_model(train) if rundir.TIGHTENED in files else pretrained
        model, _ = train_student(cfg, teacher, run.arch, train, device, progress=False)
        probs = classifier_probs(model, held, cfg, train, device)
        return accuracy(probs, torch.from_numpy(held.labels), 1)

    builders = {
        rundir.FINAL: ("after pre-training", lambda t, h: snn_top1(pretrained, t, h)),
        rundir.TIGHTENED: ("after tightening", lambda t, h: snn_top1(tightened_model(t), t, h)),
        rundir.DISTILLED: ("the student", student),
    }
    return [Candidate(f, *builders[f]) for f in files]


def _choose(run: Run, pretrained: torch.nn.Module, files: list[str]) -> Choice:
    """Which of ``files`` the run means (:mod:`paws.after.choose`), with ``choice.json``
    written and one line said."""
    candidates = _candidates(run, pretrained, files)
    default = next(f for f in DEFAULT_ORDER if f in files)
    k = run.cfg.eval.choice_folds
    if len(files) < 2 or k < 2:
        choice = Choice(
            default,
            f"the run's only model ({default})"
            if len(files) < 2
            else (f"{default}, the default (eval.choice_folds is {k}: no choice on the labels)"),
        )
    else:
        folds = len(candidates) * k
        bar = Progress(folds, "choose the model on the labels")
        with muted():
            scores, n = cross_validate(candidates, run.data, k, run.cfg.run.seed, bar.update)
        bar.close()
        choice = decide(candidates, scores, n, default)
    write_choice(run.out, choice, candidates)
    info(f"the run means {choice.reason}")
    return choice


def finish_run(run: Run, step: int, evals: rundir.MetricsLog) -> dict[str, Any] | None:
    """After the last step: ``last.pt`` and ``final.pt``, PAWS-NN on the test set, tightening
    (``tighten.after_training``) and PAWS-NN again, the choice of the model the run means
    (``choice.json``), ``eval.json`` and ``predictions.json`` of the chosen model.

    Returns:
        The summary written to ``eval.json`` (None without a test set, and on ranks other
        than 0).
    """
    if not rundir.finite(run.model, run.optimizer):
        raise run.diverged(f"the weights became infinite or NaN by step {step}", step)
    main = distributed.is_main()
    tests: dict[str, dict[str, Any]] = {}
    files, pretrained, report = [rundir.FINAL], None, None
    if main:
        pretrained, report = _tested_and_tightened(run, step, evals, tests)
        if report is not None:
            files.append(rundir.TIGHTENED)
    if _distill_after_training(run, step, files[-1], tests):
        files.append(rundir.DISTILLED)
    if not main:
        return None
    choice = _choose(run, pretrained, files)
    summary = _results(run, step, choice, tests, report)
    _export_chosen(run)
    return summary


def _tested_and_tightened(
    run: Run, step: int, evals: rundir.MetricsLog, tests: dict[str, dict[str, Any]]
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """Rank 0's part before the student: ``last.pt`` and ``final.pt``, PAWS-NN on the test set
    (into ``tests`` and ``evals.csv``), tightening and PAWS-NN again (``tighten.json``).

    Returns:
        ``(a copy of the pre-trained model, the tightening report or None)``.
    """
    final = run.state(step)
    checkpoint.save(final, run.out / rundir.LAST)
    checkpoint.save(final, run.out / rundir.FINAL)
    cfg, data, device = run.cfg, run.data, run.device
    if data.test is not None:
        tests[rundir.FINAL] = paws_nn(run.model, data, cfg, device, progress=True)
        rundir.truncate_rows(run.out / rundir.EVALS, step - 1)  # a finished run resumed
        evals.log({"step": step, **{k: tests[rundir.FINAL][k] for k in ("top1", "top5")}})
    pretrained = copy.deepcopy(run.model).eval()
    report = _tighten_after_training(run, step)
    if report is not None:
        if data.test is not None:
            tests[rundir.TIGHTENED] = paws_nn(run.model, data, cfg, device, progress=True)
            report["paws_nn_before"] = _top(tests[rundir.FINAL])
            report["paws_nn_after"] = {
                **_top(tests[rundir.TIGHTENED]),
                "num_query": tests[rundir.TIGHTENED]["num_query"],
            }
        rundir.write_json(run.out / "tighten.json", report)
    return pretrained, report


def _export_chosen(run: Run) -> None:
    """``RUN/export``: the model the run means as ``paws export RUN`` writes it, so that
    ``paws.load(RUN)`` opens it without rebuilding its support and the known score's graph
    (``run.export``; a run without labelled images has nothing to classify against)."""
    if not run.cfg.run.export or not len(run.data.labeled):
        return
    from paws.apply.load import from_checkpoint

    try:
        model = from_checkpoint(run.out, None, run.device, run.data)  # the data in hand
        model.export(run.out / rundir.EXPORT, progress=True)
    except UserError as e:  # the run is saved; only the shortcut is missing
        info(f"the model was not exported to {run.out / rundir.EXPORT} ({e})")


def _top(ev: dict[str, Any]) -> dict[str, float]:
    return {"top1": ev["top1"], "top5": ev["top5"]}


def _results(
    run: Run,
    step: int,
    choice: Choice,
    tests: dict[str, dict[str, Any]],
    report: dict[str, Any] | None,
) -> dict[str, Any] | None:
    """``eval.json`` (the chosen model's test results, every candidate's beside them) and
    ``predictions.json`` (the chosen model's); None without a test set."""
    summary: dict[str, Any] = {"model": choice.file, "step": step}
    if rundir.FINAL in tests and rundir.TIGHTENED in tests:
        summary["pretrained"] = dict(_top(tests[rundir.FINAL]), model=rundir.FINAL)
    if report is not None:
        summary["tighten"] = {k: report[k] for k in ("steps", "loss_first", "loss_last")}
    if not tests:
        return None
    ev = tests[choice.file]
    keys = ("top1", "top5", "balanced_top1", "num_support", "num_query", "features")
    summary.update({k: ev[k] for k in keys})
    summary["choice"] = {"reason": choice.reason, "folds": choice.folds}
    summary["candidates"] = {
        f: {**_top(e), "balanced_top1": e["balanced_top1"]} for f, e in tests.items()
    }
    rundir.write_results(run.out, summary, ev, run.data.classes)
    return summary
