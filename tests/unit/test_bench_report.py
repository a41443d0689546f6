"""`make bench` writes each benchmark's figures into its own block of docs/benchmarks.md and
leaves every other block, and the prose, as it was (bench/report.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MACHINE = {"CPU": "Test CPU", "cores": "2", "memory": "8.0 GiB", "GPU": "none", "OS": "Linux",
           "Python": "3.11.7", "torch": "2.13.0"}
FACTS = {"date": "2026-11-24 05:00 UTC", "seconds": "80", "load": "1.0 → 2.0"}
DOC = """# Benchmarks

<!-- machine -->
old machine
<!-- /machine -->

## Ingest

Prose about 77 messages/s, written by hand.

<!-- bench:ingest -->
old ingest figures
<!-- /bench:ingest -->

## Engine

<!-- bench:engine -->
old engine figures
<!-- /bench:engine -->
"""


def test_a_rerun_replaces_its_own_block_and_nothing_else(report) -> None:
    block = report.block("ingest", "264 messages/s\n", FACTS, MACHINE, "abc1234")
    doc = report.update(DOC, "ingest", block)
    assert "old ingest figures" not in doc and "264 messages/s" in doc
    assert "old engine figures" in doc, "a benchmark not rerun keeps its figures"
    assert "Prose about 77 messages/s, written by hand." in doc
    assert "run of 2026-11-24 05:00 UTC" in doc and "commit abc1234" in doc and "Test CPU" in doc
    assert doc.count("<!-- bench:ingest -->") == 1 and doc.count("<!-- /bench:ingest -->") == 1


def test_a_benchmark_without_a_block_gets_a_section_at_the_end(report) -> None:
    doc = report.update(DOC, "websocket_fanout", report.block("websocket_fanout", "10000 open\n", FACTS, MACHINE, "x"))
    assert doc.rstrip().endswith("<!-- /bench:websocket_fanout -->")
    assert "## Websockets held and token fan-out" in doc
    assert "old ingest figures" in doc


def test_figures_keep_their_lines_but_not_progress_or_warnings(report) -> None:
    output = ("starting the stack…\n/x.py:1: RuntimeDirWarning: no XDG\n  return Path(self.user_runtime_dir)\n"
              "\n\n\nphase one: 10/s\n\nphase two: 5/s\n")
    assert report.keep(output) == "phase one: 10/s\n\nphase two: 5/s"


def test_every_benchmark_file_runs_and_the_helpers_do_not(report) -> None:
    names = report.benchmarks()
    assert {"ingest", "websocket_fanout", "pipeline"} <= set(names)
    assert "report" not in names and "procstat" not in names
    assert not (ROOT / "bench" / "websockets.py").exists(), "it would hide the websockets package"
