"""Run report: one self-contained ``report.html`` that says what a pipeline run produced and what to redo.

Everything is read from the files the stages leave on disk, through the stages' own answers about their
layout, so the report can be written at the end of a run, after a partial run, or later by hand
(``mmprep report CONFIG``). One job per module: :mod:`.facts` collects what each stage left and which tasks
are to redo, :mod:`.plots` draws, :mod:`.resume` writes the commands that rerun failed tasks, :mod:`.page`
renders the HTML page and writes it. Nothing here imports Airflow.
"""

from .facts import FAILED_STATES, DownloadFacts, StageFacts, collect, failed_tasks
from .page import REPORT_NAME, build_report_html, default_report_path, write_report
from .resume import MAX_RUN_LINES, resume_commands

__all__ = ["FAILED_STATES", "MAX_RUN_LINES", "REPORT_NAME", "DownloadFacts", "StageFacts", "build_report_html",
           "collect", "default_report_path", "failed_tasks", "resume_commands", "write_report"]
