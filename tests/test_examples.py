"""Smoke tests of the scripts in ``examples/``: each runs to completion in a subprocess,
writes its files and prints the facts it claims (computed, not asserted by the script).

Every ``name: True`` / ``name: False`` line a script prints is checked against the value
expected here, so a script cannot pass by printing a failed claim.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FACT = re.compile(r"^(?P<name>[^\n]+?): (?P<value>True|False)$", re.MULTILINE)

# script -> (facts it must print with their values, files it must write in --out)
EXPECTED: dict[str, tuple[dict[str, bool], list[str]]] = {
    "curvature_summary.py": ({}, []),
    "hessian_diagonal_function.py": (
        {
            "hessian_diagonal matches finite differences": True,
            "nested tapes give the diagonal": False,
        },
        [],
    ),
    "prior_tuning.py": ({"grid search no worse than MAP": True}, []),
    "regression_1d.py": (
        {"std in gap > std on data": True, "std outside data > std on data": True},
        ["regression_1d.png"],
    ),
    "classification_calibration.py": (
        {
            "Laplace shifted NLL < MAP shifted NLL": True,
            "Laplace shifted ECE < MAP shifted ECE": True,
            "test accuracy within one point of MAP": True,
        },
        ["classification_calibration.png"],
    ),
    "last_layer_cnn.py": (
        {
            "model weights unchanged": True,
            "last-layer rotated NLL < MAP rotated NLL": True,
            "last-layer rotated ECE < MAP rotated ECE": True,
        },
        ["last_layer_cnn.png"],
    ),
    "predictive_sampling.py": (
        {
            "nn samples, same seed identical": True,
            "nn samples, other seed different": True,
            "glm sample mean and variance within MC error": True,
            "model weights unchanged": True,
        },
        ["predictive_samples.npz", "predictive_sampling.png"],
    ),
    "continual.py": ({"penalty forgets less than fine-tuning": True}, []),
    "evidence_weight_decay.py": (
        {"evidence test accuracy within 1.5 points of the best fixed decay": True},
        [],
    ),
    "poisson_likelihood.py": (
        {
            "poisson curvature matches a dense reference": True,
            "poisson gradient matches autodiff": True,
            "predicted rates positive and finite": True,
            "model weights unchanged": True,
        },
        [],
    ),
}
#: Each script is a subprocess of 10-80 s: ``make test-slow`` (and CI) runs them; the
#: default run keeps the coverage check and the quickstart (one script of the docs).
SLOW = set(EXPECTED)
# Scripts that take no --out (they write nothing).
NO_OUT = {"curvature_summary.py"}


def test_every_example_is_covered():
    scripts = sorted(path.name for path in EXAMPLES.glob("*.py"))
    assert scripts == sorted(EXPECTED), "add new examples to EXPECTED in this file"


def run_example(script: str, out: Path) -> str:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", MPLBACKEND="Agg")
    args = [sys.executable, str(EXAMPLES / script)]
    if script not in NO_OUT:
        args += ["--out", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.parametrize(
    "script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in EXPECTED]
)
def test_example_runs_and_its_claims_hold(script, tmp_path):
    facts, files = EXPECTED[script]
    stdout = run_example(script, tmp_path)
    printed = {m["name"].strip(): m["value"] == "True" for m in FACT.finditer(stdout)}
    for name in facts:
        assert name in printed, f"{script} did not print {name!r}:\n{stdout}"
    # every printed claim has its expected value; unlisted claims must be True
    for name, value in printed.items():
        assert value == facts.get(name, True), f"{script}: {name}: {value}\n{stdout}"
    for name in files:
        path = tmp_path / name
        assert path.is_file() and path.stat().st_size > 1000, f"{script} did not write {name}"
        assert f"Wrote {path}" in stdout
    if script == "curvature_summary.py":
        gap = float(re.search(r"max relative gap ([0-9.e+-]+)", stdout).group(1))
        assert gap < 1e-4
        assert len(re.findall(r"^sequential/\S+\s+\(", stdout, re.MULTILINE)) == 4


def test_quickstart_code_runs_as_one_script(tmp_path):
    """The python blocks of docs/quickstart.md, in order, run as one script."""
    page = (EXAMPLES.parent / "docs" / "quickstart.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.DOTALL)
    assert len(blocks) >= 6
    script = tmp_path / "quickstart.py"
    script.write_text("\n\n".join(blocks))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "reliability.png").is_file()
    sigma = float(re.search(r"^sigma_noise: ([0-9.e+-]+)$", result.stdout, re.MULTILINE)[1])
    assert 0.05 < sigma < 0.5  # tuned from its start at 1.0 towards the true noise 0.1


def test_tasks_page_runs_as_one_script(tmp_path):
    """The python blocks of docs/tasks.md (weighted examples, per-token and per-pixel
    outputs, a selected output), in order, run as one script and print what they claim."""
    page = (EXAMPLES.parent / "docs" / "tasks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.DOTALL)
    script = tmp_path / "tasks.py"
    script.write_text("\n\n".join(blocks))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", MPLBACKEND="Agg")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "per-token probabilities: (3, 6, 4)" in result.stdout
    assert "per-pixel mean and variance: (2, 8, 8, 1) (2, 8, 8, 1)" in result.stdout
    assert "'logits/kernel'" in result.stdout and "aux" not in result.stdout.split("head:")[1]
