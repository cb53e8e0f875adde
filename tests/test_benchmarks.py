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


def test_switch_dip_reads_the_fall_at_the_switch(tmp_path):
    """Teacher = best pre-training validation; dip = teacher minus the lowest self-training
    validation in the first 200 iterations; recovery = first self-training iteration at the teacher's level."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from switch_dip import switch_dip

    rows = [("pretrain", 100, 0.70), ("pretrain", 200, 0.80), ("pretrain", 300, 0.75),
            ("selftrain", 20, 0.50), ("selftrain", 40, 0.40), ("selftrain", 60, 0.79),
            ("selftrain", 80, 0.81), ("selftrain", 300, 0.30), ("selftrain", 400, 0.86)]  # fmt: skip
    teacher = {("selftrain", 20): 0.83}  # the teacher's validation beside the student's
    lines = ["phase,iteration,val_dice_mean,teacher_val_dice_mean"] + [
        f"{p},{i},{v},{teacher.get((p, i), '')}" for p, i, v in rows]
    (tmp_path / "train_log.csv").write_text("\n".join(lines) + "\n")
    got = switch_dip(tmp_path)
    assert got["teacher_val"] == 0.80
    assert got["first_selftrain_val"] == 0.50 and got["teacher_at_first"] == 0.83
    assert got["lowest_in_200"] == 0.40  # the 0.30 at iteration 300 lies outside the window
    assert abs(got["dip"] - 0.40) < 1e-12
    assert got["back_at_teacher_iteration"] == 80
    assert got["best_selftrain_val"] == 0.86
    assert got["test_dice"] != got["test_dice"]  # NaN: the run has no eval/summary.json
