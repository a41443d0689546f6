"""Run the benchmarks and record their figures in docs/benchmarks.md (`make bench`).

Every `bench/*.py` but the helpers is a benchmark. Each runs in turn (its output goes to
the terminal as it comes); the output of each one that succeeds replaces that benchmark's
block of figures in docs/benchmarks.md, between `<!-- bench:NAME -->` and
`<!-- /bench:NAME -->` (a benchmark without a block gets a new section at the end). Each
block says when it was run, on which machine, at which commit and how busy the machine
was; a block whose benchmark failed or was not run keeps its figures and its own date, so
the document always says which figures come from which run. The prose around the blocks
is written by hand. The machine block at the top describes the machine of the newest run.

Run: `.venv/bin/python bench/report.py [--only ingest,websocket_fanout] [--dry-run]`.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
DOC = ROOT / "docs" / "benchmarks.md"
HELPERS = {"procstat.py", "report.py"}  # modules of the benchmarks, not benchmarks
ORDER = ["pipeline", "engine", "rebuild", "connections", "long_conversation", "ingest", "websocket_fanout"]
TITLES = {
    "ingest": "Accepted messages per second (`bench/ingest.py`)",
    "websocket_fanout": "Websockets held and token fan-out (`bench/websocket_fanout.py`)",
    "retrain_quality": "Reply quality before and after retraining (`bench/retrain_quality.py`)",
}


def benchmarks() -> list[str]:
    found = sorted(p.stem for p in BENCH.glob("*.py") if p.name not in HELPERS)
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


def _first(path: str, pattern: str) -> str:
    try:
        text = Path(path).read_text()
    except OSError:
        return "unknown"
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1).strip() if match else "unknown"


def machine() -> dict[str, str]:
    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    mem_kib = _first("/proc/meminfo", r"^MemTotal:\s+(\d+)")
    memory = f"{int(mem_kib) / 2**20:.1f} GiB" if mem_kib.isdigit() else "unknown"
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        gpu = "none"
    return {
        "CPU": _first("/proc/cpuinfo", r"^model name\s*:\s*(.+)$"),
        "cores": str(os.cpu_count()),
        "memory": memory,
        "GPU": gpu,
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "torch": torch,
    }


def short(m: dict[str, str]) -> str:
    return f"{m['CPU']}, {m['cores']} cores, {m['memory']}, Python {m['Python']}, torch {m['torch']}"


def commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' with local changes' if dirty else ''}" if head else "unknown"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "?"


def run(name: str) -> tuple[int, str, dict[str, str]]:
    """Run one benchmark, echoing its output; (exit status, output, facts of the run)."""
    started = datetime.datetime.now().astimezone()
    load_before, t0 = load(), time.monotonic()
    proc = subprocess.Popen([sys.executable, str(BENCH / f"{name}.py")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    status = proc.wait()
    facts = {"date": started.strftime("%Y-%m-%d %H:%M %Z"), "seconds": f"{time.monotonic() - t0:.0f}",
             "load": f"{load_before} → {load()}"}
    return status, "".join(lines), facts


def keep(output: str) -> str:
    """The figures: the output without progress lines and library warnings."""
    noise = re.compile(r"(Warning|warnings\.warn|return Path\(self\.user_runtime_dir\)|…$)")
    kept = [line.rstrip() for line in output.splitlines() if not noise.search(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()  # single blank lines stay


def block(name: str, output: str, facts: dict[str, str], m: dict[str, str], at: str) -> str:
    return (
        f"<!-- bench:{name} -->\n"
        f"Figures of the run of {facts['date']} (`make bench`, commit {at}), on {short(m)};"
        f" load average {facts['load']} (other work shared the machine: compare runs with care);"
        f" {facts['seconds']} s.\n\n```\n{keep(output)}\n```\n"
        f"<!-- /bench:{name} -->"
    )


def update(doc: str, name: str, new_block: str) -> str:
    pattern = re.compile(rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.DOTALL)
    if pattern.search(doc):
        return pattern.sub(lambda _: new_block, doc, count=1)
    title = TITLES.get(name, f"`bench/{name}.py`")
    return doc.rstrip() + f"\n\n## {title}\n\n{new_block}\n"


def machine_block(m: dict[str, str], date: str) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in m.items())
    return (f"<!-- machine -->\nThe newest run ({date}) was on this machine:\n\n| | |\n| --- | --- |\n{rows}\n"
            f"<!-- /machine -->")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="list what would run; change nothing")
    args = parser.parse_args()
    names = benchmarks()
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"no such benchmark: {', '.join(unknown)}; there are: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    if args.dry_run:
        print("would run: " + ", ".join(f"bench/{n}.py" for n in names))
        return 0
    m, at = machine(), commit()
    failed = []
    for name in names:
        print(f"\n=== bench/{name}.py ===", flush=True)
        status, output, facts = run(name)
        if status != 0:
            failed.append(name)
            print(f"=== bench/{name}.py failed (exit {status}): its figures in {DOC.name} stay as they were",
                  flush=True)
            continue
        doc = DOC.read_text()  # read again each time: the file may have been edited meanwhile
        doc = update(doc, name, block(name, output, facts, m, at))
        doc = re.sub(r"<!-- machine -->.*?<!-- /machine -->", lambda _: machine_block(m, facts["date"]), doc,
                     count=1, flags=re.DOTALL)
        DOC.write_text(doc)
        print(f"=== bench/{name}.py: figures written to {DOC.relative_to(ROOT)}", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
