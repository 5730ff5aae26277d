"""`bench/gc_pauses.py` runs on the CPU as its docstring says: the service on its embedded models, a full collection
with the heap as loaded against frozen, then requests on each side with the collections Python ran meanwhile."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_collector_benchmark_measures_both_sides_of_the_service_s_heap() -> None:
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "bench.gc_pauses", "--rounds", "1", "--requests", "2"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root, check=False)
    assert finished.returncode == 0, finished.stderr[-2000:]
    out = finished.stdout
    froze = re.search(r"the service froze (\d+) objects once its models were loaded", out)
    assert froze, out
    loaded = re.search(r"\| heap as loaded \| (\d+) \| ([\d.]+) \|", out)
    frozen = re.search(r"\| heap frozen \(the service\) \| (\d+) \| ([\d.]+) \|", out)
    assert loaded, out
    assert frozen, out
    assert int(loaded[1]) > int(froze[1]) // 2 > 0
    assert int(frozen[1]) < int(loaded[1]) // 10
    sides = re.findall(r"- 2 requests, heap (as loaded|frozen): p50 [\d.]+ ms, .*generation 2: \d+", out)
    assert sides == ["as loaded", "frozen", "as loaded", "frozen"], out
