"""Where rank 0's reports go: callbacks, and a JSON-lines file when ADAPTRUN_REPORT_FILE is set.

A sink is any callable taking a ``report.Report``. ``add_report_sink`` adds one for the
process; ``emit`` validates the report and hands it to every sink (the file sink appends one
JSON object per line and flushes, so a reader can tail it). The next issue adds a sink that
sends reports to the agent; nothing here knows about transports.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from ..science.report import Report

__all__ = ["add_report_sink", "remove_report_sink", "emit", "JsonLinesSink", "record_metric",
           "recorded_metric"]

_sinks: list[Callable[[Report], None]] = []
_metric: tuple[str, float] | None = None


def record_metric(name: str, value: float) -> None:
    """The script's own figure of merit (e.g. held-out accuracy), shown in ``adaptrun run``'s
    summary and ``adaptrun status``: call it on any rank; rank 0's value is reported at once."""
    global _metric
    name = str(name)
    if not name or len(name) > 64 or not name.isprintable():
        raise ValueError(f"record_metric: name must be 1-64 printable characters, got {name!r}")
    _metric = (name, float(value))
    from . import job
    j = job._job
    if j is not None and j.parallel is not None and j.world.rank == 0:
        j.parallel._report()


def recorded_metric() -> tuple[str, float] | None:
    return _metric


class JsonLinesSink:
    """Appends each report as one JSON line to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, report: Report) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(report.to_dict()) + "\n")


def add_report_sink(sink: Callable[[Report], None]) -> None:
    _sinks.append(sink)


def remove_report_sink(sink: Callable[[Report], None]) -> None:
    if sink in _sinks:
        _sinks.remove(sink)


def emit(report: Report) -> None:
    report.validate()
    path = os.environ.get("ADAPTRUN_REPORT_FILE")
    if path:
        JsonLinesSink(path)(report)
    for sink in list(_sinks):
        sink(report)
