"""Recovery after a hard kill of Snakemake itself, measured on config/tiny.yaml.

For each kill point (the generator's first checkpoint, the embed job's start, the SRA-Seg training's
first checkpoint),
a fresh scratch folder runs the workflow, and SIGKILL goes to Snakemake and every job it started (as a
rebooted login node or an out-of-memory kill of the session would). Then: a plain rerun (expected to
stop with "cannot be locked"), `snakemake --unlock`, and a rerun to the end. The metrics
(eval/summary.json of each experiment, report/results.csv) are compared with those of an
uninterrupted run of the same config in its own folder.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kill_snakemake.py            # ~4 tiny runs
    .venv/bin/python benchmarks/kill_snakemake.py --reference /tmp/done_run    # reuse a finished run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_all import REPO, complete_run, snakemake

log = logging.getLogger("benchmarks.kill_snakemake")

# (name, the file whose appearance marks the moment of the kill, seconds waited after it appears)
KILL_POINTS = (
    ("train_generator", "results/tiny/generator/last.ckpt", 0.5),
    ("embed", "results/tiny/logs/embed.log", 5.0),
    ("train", "results/tiny/sraseg/seed1/last.ckpt", 0.5),
)


def metrics(workdir: Path) -> dict:
    results = workdir / "results" / "tiny"
    found = {str(p.relative_to(results)): json.loads(p.read_text()) for p in sorted(results.glob("*/seed*/eval/summary.json"))}
    found["report/results.csv"] = (results / "report" / "results.csv").read_text()
    return found


def killed_run(workdir: Path, marker: str, wait: float, cores: int, timeout: float = 1800) -> tuple[bool, str]:
    """Start the workflow in a new session and SIGKILL the whole session once `marker` exists.
    Returns (killed before the end, the job logs there were)."""
    exe = Path(sys.executable).with_name("snakemake")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cmd = [str(exe), "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config" / "tiny.yaml"), "--cores", str(cores)]  # fmt: skip
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    while not (workdir / marker).exists():
        if process.poll() is not None or time.monotonic() > deadline:
            return False, "finished before the kill point"
        time.sleep(0.2)
    time.sleep(wait)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return True, ", ".join(sorted(p.name for p in (workdir / marker).parent.glob("*.log")))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, default=None, help="folder with a complete tiny run (else one is made)")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--root", type=Path, default=None, help="scratch root (default: a temp folder, removed)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    root = Path(tempfile.mkdtemp(prefix="sraseg_kill_")) if args.root is None else args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    reference = args.reference.resolve() if args.reference else root / "reference"
    seconds, error = complete_run(reference, args.cores)
    if error:
        log.error("reference run: %s", error)
        return 1
    want = metrics(reference)
    rows, ok = [], True
    try:
        for name, marker, wait in KILL_POINTS:
            workdir = root / f"kill_{name}"
            shutil.rmtree(workdir, ignore_errors=True)
            shutil.copytree(REPO / "config", workdir / "config")
            killed, held = killed_run(workdir, marker, wait, args.cores)
            log.info("kill at %s: killed %s (job logs: %s)", name, killed, held)
            config = workdir / "config" / "tiny.yaml"
            _, locked = snakemake(workdir, config, args.cores)
            lock_message = "cannot be locked" in locked.stdout + locked.stderr
            _, unlock = snakemake(workdir, config, args.cores, "--unlock")
            start = time.perf_counter()
            _, rerun = snakemake(workdir, config, args.cores)
            rerun_s = time.perf_counter() - start
            same = rerun.returncode == 0 and metrics(workdir) == want
            leftovers = sorted(str(p.relative_to(workdir)) for p in workdir.glob("results/**/last.ckpt"))
            ok &= killed and lock_message and unlock.returncode == 0 and same and not leftovers
            rows.append((name, killed, lock_message, unlock.returncode, rerun.returncode, f"{rerun_s:.0f}", same,
                         leftovers or "none"))  # fmt: skip
            log.info("kill at %s: killed %s; rerun before unlock says 'cannot be locked': %s; unlock rc %d; "
                     "rerun rc %d in %.0f s; metrics identical to the uninterrupted run: %s; last.ckpt left: %s",
                     name, killed, lock_message, unlock.returncode, rerun.returncode, rerun_s, same,
                     leftovers or "none")  # fmt: skip
            if rerun.returncode != 0:
                log.error("%s", rerun.stderr[-2000:])
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    log.info("kill points: %d, all recovered with identical metrics: %s", len(rows), ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
