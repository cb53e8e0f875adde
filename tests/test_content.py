"""The content stage: what the synthetic images contain, as the labeled-only model segments them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers_data import run_cli
from train_fixtures import disc_slice, make_prepared, make_synthetic

from sraseg.errors import DatasetError, WeightsError
from sraseg.evaluate.content import (
    MIN_AREA,
    area_fractions,
    compare_areas,
    content_stats,
    floor_stats,
    intensity_stats,
    run,
)

NAMES = ["RV", "MYO", "LV"]


def label_stack(n: int = 6, seed: int = 0) -> np.ndarray:
    """Cardiac-like label maps (RV, MYO ring, LV disc) of 32 px."""
    rng = np.random.default_rng(seed)
    return np.stack([disc_slice(rng)[1] for _ in range(n)])


def test_real_scored_as_synthetic_gives_zero_gap_and_zero_w1():
    labels = label_stack()
    stats = content_stats(labels, labels.copy(), 4)
    assert list(stats) == NAMES
    for name, s in stats.items():
        assert s["presence_real"] == s["presence_synthetic"] == 1.0, name  # every disc slice holds all three
        assert s["presence_gap"] == 0.0 and s["area_w1"] == 0.0, name
        assert s["area_mean_real"] == s["area_mean_synthetic"] > 0, name


def maps_with(pixels: dict[int, int], shape=(40, 25)) -> np.ndarray:
    """One label map of 1000 px with `pixels[c]` pixels of class c (the rest background)."""
    flat = np.zeros(shape[0] * shape[1], np.uint8)
    start = 0
    for cls, count in pixels.items():
        flat[start : start + count] = cls
        start += count
    return flat.reshape(shape)


def test_hand_computed_presence_and_w1():
    # 1000-pixel maps: 1 px is exactly MIN_AREA (0.1%), which counts as present.
    assert MIN_AREA == 0.001
    real = np.stack([maps_with({1: 10}), maps_with({1: 20, 2: 5})])
    synthetic = np.stack([maps_with({2: 5, 3: 100}), maps_with({1: 10, 3: 1})])
    np.testing.assert_allclose(area_fractions(real, 4), [[0.01, 0, 0], [0.02, 0.005, 0]])
    stats = content_stats(real, synthetic, 4)
    # RV: real in both, synthetic in one; areas real {0.01, 0.02} vs synthetic {0, 0.01}: W1 = mean(0.01, 0.01)
    assert stats["RV"]["presence_real"] == 1.0 and stats["RV"]["presence_synthetic"] == 0.5
    assert stats["RV"]["presence_gap"] == pytest.approx(-0.5)
    assert stats["RV"]["area_w1"] == pytest.approx(0.01)
    assert stats["RV"]["area_mean_real"] == pytest.approx(0.015)
    assert stats["RV"]["area_mean_synthetic"] == pytest.approx(0.005)
    # MYO: one image of each set, the same 0.5% area: same distribution
    assert stats["MYO"]["presence_gap"] == 0.0 and stats["MYO"]["area_w1"] == pytest.approx(0.0)
    # LV: absent from real; synthetic {0.1, 0.001 (exactly the threshold, present)}: W1 = mean(0.1, 0.001)
    assert stats["LV"]["presence_real"] == 0.0 and stats["LV"]["presence_synthetic"] == 1.0
    assert stats["LV"]["presence_gap"] == pytest.approx(1.0)
    assert stats["LV"]["area_w1"] == pytest.approx(0.0505)


def test_blank_synthetic_images_have_no_class_and_a_gap_of_minus_the_real_presence():
    real = label_stack()
    real[0][real[0] == 1] = 0  # one real slice without RV: real RV presence 5/6
    blank = np.zeros_like(real)
    stats = content_stats(real, blank, 4)
    real_areas = area_fractions(real, 4)
    assert stats["RV"]["presence_real"] == pytest.approx(5 / 6)
    for k, name in enumerate(NAMES):
        s = stats[name]
        assert s["presence_synthetic"] == 0.0 and s["presence_real"] > 0, name
        assert s["presence_gap"] == pytest.approx(-s["presence_real"]), name
        # W1 to a point mass at 0 is the mean area
        assert s["area_w1"] == pytest.approx(real_areas[:, k].mean()), name


def test_floor_between_patient_disjoint_halves():
    areas = np.array([[0.01, 0.0, 0.02], [0.01, 0.0, 0.02], [0.03, 0.005, 0.0], [0.03, 0.005, 0.0]])
    floor = floor_stats(areas, np.array(["p1", "p1", "p2", "p2"]), NAMES)
    assert floor["sizes"] == [2, 2] and floor["patients"] == [1, 1]
    assert floor["per_class"]["RV"] == {"presence_gap": 0.0, "area_w1": pytest.approx(0.02)}
    assert floor["per_class"]["MYO"]["presence_gap"] == 1.0  # a magnitude, whichever half is A
    # MYO only in p2, LV only in p1: one of the two signed gaps is -1, whichever half is A
    assert floor["per_class"]["LV"] == {"presence_gap": 1.0, "area_w1": pytest.approx(0.02)}
    assert floor_stats(areas, np.array(["p1"] * 4), NAMES) is None
    with pytest.raises(ValueError, match="synthetic areas"):
        compare_areas(areas, np.zeros((0, 3)), NAMES)


def test_intensity_check_is_the_mean_of_per_slice_minima():
    images = np.stack([np.linspace(0, 1, 16).reshape(4, 4), np.full((4, 4), 0.4)])
    stats = intensity_stats(images)
    assert stats["mean_min"] == pytest.approx(0.2)  # (0 + 0.4) / 2, not the global minimum 0
    assert stats["mean"] == pytest.approx((0.5 + 0.4) / 2)


def train_model(path: Path, steps: int = 60) -> Path:
    """A small U-Net trained for a few seconds on disc slices (about 93% pixel accuracy), saved as the train
    stage saves one (model.safetensors + model.json with image_size and method)."""
    import torch

    from sraseg.train.unet import UNet, save_model

    torch.manual_seed(0)
    rng = np.random.default_rng(10)
    images, labels = zip(*(disc_slice(rng) for _ in range(24)))
    x, y = torch.from_numpy(np.stack(images))[:, None], torch.from_numpy(np.stack(labels)).long()
    net = UNet(1, 4, [8, 16], [0.0, 0.0])
    optimizer = torch.optim.Adam(net.parameters(), 1e-2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few seconds on one thread; far slower with threads competing on a busy machine
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True)
    save_model(path, net.eval(), dict(image_size=32, method="labeled_only", seed=1))
    return path


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory) -> Path:
    return train_model(tmp_path_factory.mktemp("model") / "labeled_only" / "seed1" / "model.safetensors")


@pytest.fixture
def stage_inputs(tmp_path: Path, trained_model: Path) -> dict[str, Path]:
    """Prepared folder with two unlabeled train patients (002, 003: 12 slices), 8 synthetic images, a model."""
    prepared = make_prepared(tmp_path)
    table = pd.read_parquet(prepared / "slices.parquet")
    table.loc[table["patient"] == "patient002", "labeled"] = False
    table.to_parquet(prepared / "slices.parquet")
    return dict(
        model=trained_model,
        synthetic_dir=make_synthetic(tmp_path, count=8),
        prepared_dir=prepared,
    )


def test_run_writes_every_file_and_the_json_matches_the_table(stage_inputs: dict, tmp_path: Path):
    from sraseg.report.run import content_lines

    out = tmp_path / "results" / "content"
    record = run(**stage_inputs, out_dir=out, settings={"device": "cpu", "batch_size": 3})
    assert sorted(p.name for p in out.iterdir()) == ["content.json", "content.parquet", "content.png"]
    assert (out / "content.png").stat().st_size > 1000
    saved = json.loads((out / "content.json").read_text())
    assert saved["classes"] == NAMES and set(saved["per_class"]) == set(NAMES)
    assert saved["n_synthetic"] == 8 and saved["n_real"] == 8 and saved["real_set"] == "unlabeled_train"
    assert saved["min_area"] == MIN_AREA and saved["model"] == str(stage_inputs["model"])  # outside the working directory: as given
    assert saved["floor"]["patients"] == [1, 1]
    # the disc slices hold every class, and the trained model finds them in the real ones
    assert all(saved["per_class"][name]["presence_real"] == 1.0 for name in NAMES)
    for name in NAMES:
        assert saved["per_class"][name]["area_w1_floor"] is not None

    table = pd.read_parquet(out / "content.parquet")
    slices = pd.read_parquet(stage_inputs["prepared_dir"] / "slices.parquet").set_index("slice_id")
    real = table[table["source"] == "real"]
    assert len(real) == 8 and real["image_id"].is_unique
    held_out = slices.loc[real["image_id"]]
    assert (held_out["split"] == "train").all() and not held_out["labeled"].any()
    assert list(held_out["patient"]) == list(real["patient"])
    synthetic = table[table["source"] == "synthetic"]
    assert list(synthetic["image_id"]) == list(range(8))
    # the JSON's statistics are those of the table's areas, real against synthetic (not the other way round)
    columns = [f"area_{n}" for n in NAMES]
    expected = compare_areas(real[columns].to_numpy(), synthetic[columns].to_numpy(), NAMES)
    for name in NAMES:
        for key, value in expected[name].items():
            assert saved["per_class"][name][key] == pytest.approx(value), (name, key)
    images = np.load(stage_inputs["synthetic_dir"] / "images.npy")
    assert saved["intensity"]["synthetic"]["mean_min"] == pytest.approx(images.min(axis=(1, 2)).mean())
    assert synthetic["min_intensity"].to_numpy() == pytest.approx(images.min(axis=(1, 2)))

    # the same seed draws the same held-out slices; the report turns the record into its section
    again = run(**stage_inputs, out_dir=tmp_path / "again", settings={"device": "cpu"})
    assert again["per_class"] == record["per_class"]
    lines = content_lines(tmp_path / "results")
    assert len(lines) == 1 + len(NAMES) + 1
    assert all(any(line.startswith(f"- {name}: present in 100% of real") for line in lines) for name in NAMES)
    assert "mean per-slice minimum" in lines[-1]


def test_report_section_in_markdown_and_html(tmp_path: Path):
    from test_report import EXPERIMENTS, write_summary

    from sraseg.io import write_json
    from sraseg.report.run import CONTENT_HEADING, collect_results, content_lines, write_html, write_markdown

    results = tmp_path / "results" / "phantom"
    write_summary(results, "labeled_only", 1, 0.8, 2.0)
    write_summary(results, "sraseg", 1, 0.7, 3.0)
    per_class = {name: dict(presence_real=0.9, presence_synthetic=0.4, presence_gap=-0.5, presence_gap_floor=0.05,
                            area_mean_real=0.02, area_mean_synthetic=0.01, area_w1=0.0123, area_w1_floor=0.0021)
                 for name in NAMES}  # fmt: skip
    (results / "content").mkdir()
    write_json(results / "content" / "content.json", dict(
        model="/x/results/phantom/labeled_only/seed1/model.safetensors", model_method="labeled_only", min_area=0.001,
        n_synthetic=40, n_real=40, real_set="unlabeled_train", real_patients=5, classes=NAMES, per_class=per_class,
        floor=dict(sizes=[21, 19]), intensity=dict(synthetic=dict(mean=0.5, mean_min=0.31),
                                                   real=dict(mean=0.2, mean_min=0.01), grey_background=True)))  # fmt: skip
    lines = content_lines(results)
    assert "labeled_only/seed1/model.safetensors" in lines[0] and "sizes 21 and 19" in lines[0]
    assert lines[1] == ("- RV: present in 90% of real, 40% of synthetic images, gap **-50 points** (floor 5 points); "
                        "area W1 **0.0123** (floor 0.0021), mean area 2.0% real, 1.0% synthetic")  # fmt: skip
    assert "minimum 0.310 synthetic, 0.010 real (**grey background**" in lines[-1]
    frame = collect_results(results, EXPERIMENTS, [1])
    write_markdown(frame, tmp_path / "results.md", "Results", [], [1], lines)
    write_html(frame, tmp_path / "results.html", "Results", [], [1], lines)
    markdown, page = (tmp_path / "results.md").read_text(), (tmp_path / "results.html").read_text()
    assert f"## {CONTENT_HEADING}\n\n{lines[0]}" in markdown and lines[1] in markdown
    assert f"<h2>{CONTENT_HEADING}</h2>" in page and "gap <strong>-50 points</strong>" in page
    # a damaged record is one error naming the file
    write_json(results / "content" / "content.json", dict(model="m"))
    with pytest.raises(DatasetError, match=r"content/content\.json: not a content record"):
        content_lines(results)


def test_blank_synthetic_set_end_to_end(stage_inputs: dict, tmp_path: Path):
    """The trained model finds every class in the real slices and nothing in black images."""
    np.save(stage_inputs["synthetic_dir"] / "images.npy", np.zeros((8, 32, 32), np.float32))
    record = run(**stage_inputs, out_dir=tmp_path / "out", settings={"device": "cpu"})
    for name in NAMES:
        s = record["per_class"][name]
        assert s["presence_real"] == 1.0 and s["presence_synthetic"] == 0.0, name
        assert s["presence_gap"] == -1.0 and s["area_w1"] == pytest.approx(s["area_mean_real"]), name
        assert s["presence_gap_floor"] == 0.0 and s["area_w1_floor"] < s["area_w1"], name
    assert record["intensity"]["synthetic"] == {"mean": 0.0, "mean_min": 0.0}
    assert not record["intensity"]["grey_background"]


def test_grey_synthetic_images_are_flagged(stage_inputs: dict, tmp_path: Path):
    np.save(stage_inputs["synthetic_dir"] / "images.npy", np.full((8, 32, 32), 0.5, np.float32))
    record = run(**stage_inputs, out_dir=tmp_path / "out", settings={"device": "cpu"})
    assert record["intensity"]["synthetic"]["mean_min"] == pytest.approx(0.5)
    assert record["intensity"]["real"]["mean_min"] < 0.1 and record["intensity"]["grey_background"]


def test_n_images_caps_both_sets(stage_inputs: dict, tmp_path: Path):
    record = run(**stage_inputs, out_dir=tmp_path / "out", settings={"device": "cpu", "n_images": 5})
    assert record["n_synthetic"] == 5 and record["n_real"] == 5


def no_output_left(out: Path) -> bool:
    """Neither the output folder nor a staging folder beside it."""
    if out.exists():
        return False
    return not out.parent.exists() or not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_missing_model_is_one_error_naming_it_and_leaves_nothing(stage_inputs: dict, tmp_path: Path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    out = tmp_path / "results" / "content"
    with pytest.raises(WeightsError, match=r"nowhere/model\.safetensors: no trained model here"):
        run(**{**stage_inputs, "model": missing}, out_dir=out, settings={"device": "cpu"})
    assert no_output_left(out)
    proc = run_cli("content", "--model", str(missing), "--synthetic-dir", str(stage_inputs["synthetic_dir"]),
                   "--prepared-dir", str(stage_inputs["prepared_dir"]), "--out-dir", str(out), "--device", "cpu")  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and "nowhere/model.safetensors" in errors[0]
    assert no_output_left(out)


def test_nan_synthetic_image_is_one_error_naming_the_file_and_leaves_nothing(stage_inputs: dict, tmp_path: Path):
    path = stage_inputs["synthetic_dir"] / "images.npy"
    images = np.load(path)
    images[3, 5, 7] = np.nan
    np.save(path, images)
    out = tmp_path / "results" / "content"
    with pytest.raises(DatasetError, match=r"synthetic/images\.npy: 1 image\(s\) hold NaN/inf pixels \(first image 3\)"):
        run(**stage_inputs, out_dir=out, settings={"device": "cpu"})
    assert no_output_left(out)
    proc = run_cli("content", "--model", str(stage_inputs["model"]), "--synthetic-dir", str(stage_inputs["synthetic_dir"]),
                   "--prepared-dir", str(stage_inputs["prepared_dir"]), "--out-dir", str(out), "--device", "cpu")  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(errors) == 1 and "synthetic/images.npy" in errors[0] and "NaN" in errors[0]
    assert no_output_left(out)


def test_synthetic_images_of_another_size_than_the_model_are_refused(stage_inputs: dict, tmp_path: Path):
    np.save(stage_inputs["synthetic_dir"] / "images.npy", np.zeros((4, 16, 16), np.float32))
    with pytest.raises(DatasetError, match=r"synthetic/images\.npy: images of 16 x 16 px, but the model .* 32 px"):
        run(**stage_inputs, out_dir=tmp_path / "out", settings={"device": "cpu"})
