"""pytest plugin for ``gpu_check.py``: the result JSON rewritten (atomically) after every test, so that a run
cut short by a time limit still leaves every finished test's outcome. Active when ``GPU_CHECK_JSON`` names the
file; the JSON's other fields come from the file ``gpu_check.py`` writes before starting pytest."""
from __future__ import annotations

import json
import os
import time

from dali_lens.data.io import atomic_open

_PATH = os.environ.get("GPU_CHECK_JSON")
_STATE: dict = {}


def _write() -> None:
    with atomic_open(_PATH, "w") as fh:
        json.dump(_STATE, fh, indent=1)


def pytest_sessionstart(session):
    if not _PATH:
        return
    try:
        with open(_PATH) as fh:
            _STATE.update(json.load(fh))
    except (OSError, ValueError):
        pass
    _STATE.update(tests=[], counts={}, finished=False, started=time.time())
    _write()


def pytest_runtest_logreport(report):
    """One record per test: its call outcome, or the setup/teardown failure or skip."""
    if not _PATH or not (report.when == "call" or report.outcome != "passed"):
        return
    outcome = report.outcome if report.when == "call" else ("skipped" if report.skipped else "error")
    rec = {"test": report.nodeid, "outcome": outcome, "when": report.when, "seconds": round(report.duration, 3)}
    if outcome in ("failed", "error", "skipped"):
        text = report.longreprtext or ""
        rec["message"] = "\n".join(text.strip().splitlines()[-15:])
    _STATE["tests"].append(rec)
    counts = {}
    for r in _STATE["tests"]:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    _STATE["counts"] = counts
    _STATE["elapsed_s"] = round(time.time() - _STATE["started"], 1)
    _write()


def pytest_sessionfinish(session, exitstatus):
    if not _PATH:
        return
    _STATE.update(finished=True, pytest_exitstatus=int(exitstatus), elapsed_s=round(time.time() - _STATE["started"], 1))
    _write()
