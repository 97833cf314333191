"""``paws report``: figures of runs (:mod:`paws.report.figures`), the pictures drawn from a run's
test images (:mod:`paws.report.test_set`), the rounds of a labelling loop
(:mod:`paws.report.rounds`), the page that lays them out (:mod:`paws.report.page`) and the
contact sheet of images to label (:mod:`paws.labelling.sheet`)."""

from paws.report.figures import plot_accuracy, plot_curves, plot_grid, plot_last_eval, plot_tsne
from paws.report.page import Section, build_report

__all__ = [
    "Section",
    "build_report",
    "plot_accuracy",
    "plot_curves",
    "plot_grid",
    "plot_last_eval",
    "plot_tsne",
]
