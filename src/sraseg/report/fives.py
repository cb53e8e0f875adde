"""The report stage for FIVES (`sraseg report --dataset fives`): every experiment's evaluation, mean and
standard deviation over seeds, in the two modes of `sraseg.evaluate.fives` (image: per image in 2-D,
in pixels, the main table; stacked: the reference's mode, for comparison with the paper), and the
training curves.

Reads (under results/{ds}/): {exp}/seed{seed}/eval/summary.json and {exp}/seed{seed}/train_log.csv.
Writes results.csv (one row per experiment and mode), results.md and figures/training_curves.png.
A module of its own beside `sraseg.report.run` (ACDC's three cardiac classes and peer/mm modes), so
the ACDC report's code, and the workflow's hash of it, stay as they are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from sraseg.errors import DatasetError
from sraseg.io import read_json, staged_outputs
from sraseg.report.run import WARNINGS_HEADING, ReportSettings
from sraseg.report.switch import mark_experiments, marked_name, switch_warnings, warning_lines
from sraseg.settings import parse_settings

__all__ = ["MODES", "collect_results", "write_markdown", "run"]

log = logging.getLogger(__name__)

MODES = ("image", "stacked")
METRICS = ("dice", "jaccard", "hd95", "asd")
PERCENT = {"dice", "jaccard"}  # fractions in summary.json, percentages in the tables as in the papers


def collect_results(results_dir: Path, experiments: dict, seeds: list[int]) -> pd.DataFrame:
    """One row per experiment and mode: mean and std over seeds of every metric (Dice, Jaccard in %).

    Raises:
        DatasetError: a summary.json is missing or is not a FIVES evaluate summary.
    """
    rows = []
    for name, spec in experiments.items():
        summaries = {}
        for seed in seeds:
            path = results_dir / name / f"seed{seed}" / "eval" / "summary.json"
            summaries[path] = read_json(path, hint=f"evaluate experiment {name!r} seed {seed} first")
        for mode in MODES:
            values, n_cases = [], None
            for path, summary in summaries.items():
                entry = summary.get(mode) if isinstance(summary, dict) else None
                if entry is None:
                    if mode == "stacked":
                        break  # images of different sizes: the evaluate stage left this mode out
                    raise DatasetError(f"{path}: not a FIVES evaluate summary (no {mode!r} mode); rerun evaluate")
                n_cases = int(entry["n_cases"])
                values.append({m: np.nan if entry["mean"][m] is None else float(entry["mean"][m]) for m in METRICS})
            else:
                row = {"experiment": name, "method": spec.get("method", ""), "mode": mode, "n_seeds": len(values),
                       "n_cases": n_cases}  # fmt: skip
                for metric in METRICS:
                    samples = np.array([v[metric] for v in values]) * (100.0 if metric in PERCENT else 1.0)
                    finite = samples[np.isfinite(samples)]
                    row[f"{metric}_mean"] = float(finite.mean()) if finite.size else np.nan
                    row[f"{metric}_std"] = float(finite.std(ddof=1)) if finite.size > 1 else np.nan
                rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.2f} ± {std:.2f}" if np.isfinite(std) else f"{mean:.2f}"


def write_markdown(frame: pd.DataFrame, path: Path, title: str, seeds: list[int],
                   warnings: list[str] | None = None) -> None:  # fmt: skip
    """results.md: the switch guard's warnings, then one table per mode, experiments as rows, mean ± std over seeds."""
    lines = [f"# {title}", "", f"Seeds: {', '.join(str(s) for s in seeds)} (mean ± std over seeds).", ""]
    if warnings:
        lines += [f"## {WARNINGS_HEADING}", ""] + warnings + [""]
    headings = {
        "image": "Per image ({n} test images, each scored on its own in 2-D; HD95 and ASD in pixels, an empty "
                 "prediction's distances left out)",
        "stacked": "Stacked, the reference's mode ({n} test images scored as one volume; for comparison with "
                   "the paper only: its HD95 and ASD measure distances across unrelated images)",
    }  # fmt: skip
    for mode in MODES:
        part = frame[frame["mode"] == mode]
        if part.empty:
            continue
        lines += [f"## {headings[mode].format(n=int(part['n_cases'].iloc[0]))}", "",
                  "| experiment | method | Dice (%) | Jaccard (%) | HD95 (px) | ASD (px) |", "|---|---|---|---|---|---|"]  # fmt: skip
        for _, row in part.iterrows():
            cells = [_cell(row[f"{m}_mean"], row[f"{m}_std"]) for m in METRICS]
            lines.append(f"| {marked_name(row)} | {row['method']} | " + " | ".join(cells) + " |")
        lines.append("")
    path.write_text("\n".join(lines))


def run(results_dir: Path | str, out_dir: Path | str, settings: dict) -> pd.DataFrame:
    """Write results.csv, results.md and figures/training_curves.png for every experiment and seed."""
    from sraseg.report import figures

    results_dir = Path(results_dir)
    config = parse_settings(ReportSettings, settings, "report")
    if not config.experiments:
        raise DatasetError(f"{results_dir}: no experiments to report")
    frame = collect_results(results_dir, config.experiments, list(config.seeds))
    switch = switch_warnings(results_dir, config.experiments, list(config.seeds))
    frame = mark_experiments(frame, switch)
    with staged_outputs(out_dir) as staged:
        frame.to_csv(staged.path("results.csv"), index=False)
        write_markdown(frame, staged.path("results.md"), f"Results: {results_dir.name} (FIVES layout, vessel)",
                       list(config.seeds), warning_lines(switch))  # fmt: skip
        figures.training_curves(results_dir, config.experiments, config.seeds, staged.path("figures/training_curves.png"))
    log.info("FIVES report for %d experiments written to %s", len(config.experiments), out_dir)
    return frame
