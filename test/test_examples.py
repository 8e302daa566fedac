"""The examples run as a user runs them (CPU here; each asserts its own round trip)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["moe.py", "transformers_moe.py"])
def test_example_runs(script):
    if script.startswith("transformers"):
        pytest.importorskip("transformers")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", script)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SQNR" in done.stdout
