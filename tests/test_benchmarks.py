"""Smoke tests: the benchmarks run end to end on small settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_scale_benchmark_quick_run():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "scale.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=BENCHMARKS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "peak RSS growth" in result.stdout
    for method in ("gradient", "ggn", "predict"):
        assert f" {method} " in result.stdout


def test_zoo_benchmark_quick_run():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "zoo.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=BENCHMARKS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for model in ("mobilenetv2", "bilstm", "transformer"):
        row = next(line for line in result.stdout.splitlines() if line.startswith(model))
        ratios = [float(cell[:-1]) for cell in row.split() if cell.endswith("x")]
        assert len(ratios) == 6 and all(r > 0 for r in ratios[:2]), row


def test_curvature_benchmark_in_alternating_processes():
    """Two processes, one kind and the two baselines: every row has a ratio per column,
    the baselines exactly 1 against themselves, the range in brackets."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = ["--models", "mlp", "--methods", "ef", "--repeats", "1", "--processes", "2"]
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "curvature.py"), *command, "--skip-memory"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=BENCHMARKS,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line}
    assert rows["gradient"][1:3] == ["1.00", "(1.00-1.00)"], rows["gradient"]
    assert rows["gradient_pass"][3:5] == ["1.00", "(1.00-1.00)"], rows["gradient_pass"]
    ef = rows["ef"]
    assert float(ef[0]) > 0 and float(ef[1]) > 0 and ef[2].startswith("("), ef
    assert "fallback" not in rows and "ggn" not in rows
