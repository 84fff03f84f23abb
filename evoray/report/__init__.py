"""Reports on search runs: read a run directory (``load``), plot it (``plots``), summarise it
(``summary``: summary.md and ``evoray report``), and the results table of ``evoray run``
(``results``)."""

from evoray.report.load import (
    KinshipMatrix,
    ReportData,
    ReportError,
    RunData,
    generation_table,
    load_run_dir,
    run_label,
    start_fitness,
)
from evoray.report.plots import PLOTS, plot_acceptance, plot_fitness, plot_kinship
from evoray.report.summary import SUMMARY, add_report_parser, summary_markdown, write_report

__all__ = [
    "PLOTS",
    "SUMMARY",
    "KinshipMatrix",
    "ReportData",
    "ReportError",
    "RunData",
    "add_report_parser",
    "generation_table",
    "load_run_dir",
    "plot_acceptance",
    "plot_fitness",
    "plot_kinship",
    "run_label",
    "start_fitness",
    "summary_markdown",
    "write_report",
]
