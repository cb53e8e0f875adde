"""The benchmark script runs its in-process parts end to end at toy sizes and prints a value for each.

Timings at these sizes mean nothing, so only that every ratio is measured is asserted, not its goal;
the exit code must then say exactly whether a goal was missed.
The workflow parts (noop, rerun) need a complete tiny run; tests/test_workflow.py covers that run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_measures_every_in_process_ratio():
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--skip", "noop,rerun", "--repeats", "1",
        "--threads", "1", "--embed-n", "4", "--embed-input-size", "32", "--embed-img-size", "56",
        "--embed-batch", "2", "--train-size", "32", "--train-batch", "2", "--train-sa-batch", "1",
        "--train-steps", "1", "--train-warmup", "0", "--sample-resolution", "16", "--sample-channels", "16", "16",
        "--sample-images", "1", "--ddim-steps", "2", "--ddpm-steps", "4",
    ]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-3000:]
    table = output[output.index("measure"):]
    # part, measure, value, goal, status
    rows = re.findall(r"^(embed|train|sampling)\s+(.*?)\s+(\S+)\s+(>=.*?|<=.*?|-)\s+(ok|FAIL|-)\s*$", table, re.M)
    for part in ("embed", "train", "sampling"):
        values = [r[2] for r in rows if r[0] == part]
        assert values and all(re.fullmatch(r"\d+\.\d+", v) and float(v) > 0 for v in values), \
            f"no measured {part} ratio in:\n{table}"
    # exit 1 means a goal missed (expected at toy sizes), and only that
    assert proc.returncode == (1 if any(r[4] == "FAIL" for r in rows) else 0), output[-3000:]
