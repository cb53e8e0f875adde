"""The predict stage: slice-by-slice prediction, resizing back, and NIfTI output with the input geometry."""

from __future__ import annotations

import importlib.util

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from sraseg.datasets.acdc import predict_volume
from sraseg.errors import DatasetError
from sraseg.evaluate import predict

S = 16


class FixedLabels(nn.Module):
    """Stand-in model: the same label map for every slice, as confident one-hot logits."""

    def __init__(self, labels: np.ndarray, num_classes: int = 4):
        super().__init__()
        onehot = np.eye(num_classes, dtype=np.float32)[labels].transpose(2, 0, 1)  # [C,S,S]
        self.register_buffer("logits", torch.from_numpy(onehot) * 10.0)
        self.seen: list[tuple] = []

    def forward(self, x):
        self.seen.append((tuple(x.shape), float(x.min()), float(x.max())))
        return self.logits[None].expand(len(x), -1, -1, -1) + 0.0 * x.mean()


class Threshold(nn.Module):
    """Stand-in model: label 1 where the input is above 0.5 (checks axes and slice order)."""

    def forward(self, x):
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 10.0


def block_labels() -> np.ndarray:
    labels = np.zeros((S, S), np.int64)
    labels[0:4, 4:12] = 1
    labels[4:8, 8:16] = 2
    labels[8:16, 0:8] = 3
    return labels


def test_fixed_label_map_survives_resizing():
    labels = block_labels()
    model = FixedLabels(labels)
    volume = np.random.default_rng(0).random((2 * S, S, 5)).astype(np.float32)
    out = predict_volume(model, volume, S, "cpu", batch_size=2)
    assert out.shape == volume.shape and out.dtype == np.uint8
    want = np.repeat(labels, 2, axis=0)  # 2x along X, 1x along Y
    for z in range(volume.shape[2]):
        np.testing.assert_array_equal(out[:, :, z], want)
    # Batches of at most 2 slices of [1,S,S] inputs, all 5 slices seen once.
    assert [shape for shape, _, _ in model.seen] == [(2, 1, S, S), (2, 1, S, S), (1, 1, S, S)]
    assert all(0.0 <= lo and hi <= 1.0 for _, lo, hi in model.seen)


def test_axes_and_slice_order_are_kept():
    rng = np.random.default_rng(1)
    volume = rng.random((S, S, 7)).astype(np.float32)
    volume[np.abs(volume - 0.5) < 0.05] = 0.9  # keep clear of the threshold
    out = predict_volume(Threshold(), volume, S, "cpu", batch_size=3)
    np.testing.assert_array_equal(out, (volume > 0.5).astype(np.uint8))
    assert 0 < out.mean() < 1


def _write_image(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data.astype(np.int16), affine), str(path))
    return str(path)


def _prepared(tmp_path, shapes):
    """A prepared folder with volumes.parquet pointing at raw-intensity test images."""
    rng = np.random.default_rng(2)
    rows = []
    for i, (shape, split) in enumerate(shapes):
        affine = np.array([[0, -1.4, 0, 10.0], [1.6, 0, 0, -5.0], [0, 0, 8.0, 3.0], [0, 0, 0, 1]])
        case = f"patient{i + 1:03d}_frame01"
        data = rng.integers(50, 2000, size=shape)
        path = _write_image(tmp_path / "raw" / case.split("_")[0] / f"{case}.nii.gz", data, affine)
        rows.append(
            dict(
                case=case, patient=case.split("_")[0], frame=1, phase="ED", split=split, image_path=path,
                gt_path=path.replace(".nii.gz", "_gt.nii.gz"), nx=shape[0], ny=shape[1], nz=shape[2],
                sx=1.6, sy=1.4, sz=8.0, first_slice_id=0, n_slices=shape[2],
            )
        )  # fmt: skip
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    pd.DataFrame(rows).to_parquet(prepared / "volumes.parquet")
    return prepared


HAVE_UNET = importlib.util.find_spec("sraseg.train.unet") is not None


@pytest.mark.skipif(not HAVE_UNET, reason="sraseg.train.unet (load_model) is not written yet")
def test_run_writes_predictions_with_input_geometry(tmp_path):
    from sraseg.train.unet import UNet, save_model

    torch.manual_seed(0)
    model_path = tmp_path / "model.safetensors"
    save_model(model_path, UNet(1, 4, [4, 8], [0.0, 0.0]), dict(image_size=S, method="labeled_only"))
    prepared = _prepared(tmp_path, [((20, 24, 3), "test"), ((12, 16, 2), "test"), ((16, 16, 2), "val")])
    out_dir = tmp_path / "predictions"
    predict.run(model_path, prepared, "test", out_dir, batch_size=2)

    assert sorted(p.name for p in out_dir.iterdir()) == ["patient001_frame01.nii.gz", "patient002_frame01.nii.gz"]
    volumes = pd.read_parquet(prepared / "volumes.parquet")
    for row in volumes[volumes["split"] == "test"].itertuples():
        image, pred = nib.load(row.image_path), nib.load(out_dir / f"{row.case}.nii.gz")
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)
        np.testing.assert_allclose(pred.header.get_zooms(), image.header.get_zooms(), atol=1e-5)
        assert pred.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(pred.dataobj))) <= {0, 1, 2, 3}


@pytest.mark.skipif(not HAVE_UNET, reason="sraseg.train.unet (load_model) is not written yet")
def test_run_errors(tmp_path):
    from sraseg.train.unet import UNet, save_model

    model_path = tmp_path / "model.safetensors"
    save_model(model_path, UNet(1, 4, [4, 8], [0.0, 0.0]), dict(image_size=S))
    with pytest.raises(DatasetError, match="volumes.parquet: file not found"):
        predict.run(model_path, tmp_path, "test", tmp_path / "out")
    prepared = _prepared(tmp_path, [((20, 24, 3), "test")])
    volumes = pd.read_parquet(prepared / "volumes.parquet")
    volumes.loc[0, "nz"] = 4
    volumes.to_parquet(prepared / "volumes.parquet")
    with pytest.raises(DatasetError, match=r"patient001_frame01\.nii\.gz: image shape \(20, 24, 3\)"):
        predict.run(model_path, prepared, "test", tmp_path / "out")
    with pytest.raises(DatasetError, match="no cases in split 'val'"):
        predict.run(model_path, prepared, "val", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- `sraseg predict -i IN -o OUT -m RUN_DIR`: any folder of NIfTI volumes, as nnU-Net users expect ---


@pytest.fixture(scope="module")
def phantom_raw(tmp_path_factory):
    """Three phantom patients in ACDC layout (two frames each) and split lists for prepare."""
    from sraseg.data import phantom

    root = tmp_path_factory.mktemp("phantom")
    phantom.run(root / "raw", patients=3, seed=0)
    splits = root / "splits"
    splits.mkdir()
    for name, text in (("train", "patient001\n"), ("val", "patient002\n"), ("test", "patient003\n"), ("labeled", "patient001\n")):
        (splits / f"{name}.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (two-iteration) labeled_only training run laid out as results/tiny/labeled_only/seed1."""
    from train_fixtures import TINY, make_prepared

    from sraseg.train import loop

    root = tmp_path_factory.mktemp("trained")
    out = root / "results" / "tiny" / "labeled_only" / "seed1"
    loop.run(prepared_dir=make_prepared(root), out_dir=out, settings=dict(TINY, method="labeled_only"), seed=1)
    return out


def _frames(phantom_raw, patient="patient003"):
    return sorted(p for p in (phantom_raw / "raw" / patient).glob("*_frame??.nii.gz"))


def test_predict_folder_writes_each_volume_and_names_the_corrupt_one(phantom_raw, run_dir, tmp_path, capsys, caplog):
    import shutil

    from sraseg.cli import main

    inputs = tmp_path / "in"
    inputs.mkdir()
    frames = _frames(phantom_raw)
    assert len(frames) == 2
    for src in frames:
        shutil.copy(src, inputs / src.name)
    data = frames[0].read_bytes()
    (inputs / "broken.nii.gz").write_bytes(data[: len(data) // 3])  # truncated mid-stream
    series = np.stack([nib.load(frames[0]).get_fdata()] * 3, axis=-1)  # a 4-D cine series
    nib.save(nib.Nifti1Image(series.astype(np.int16), nib.load(frames[0]).affine), str(inputs / "cine_4d.nii.gz"))

    out = tmp_path / "out"
    code = main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(run_dir), "--device", "cpu"])
    final = capsys.readouterr().err.strip().splitlines()
    lines = caplog.messages  # one log record per failing or skipped input; the summary is printed

    assert code == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(f.name for f in frames)  # no temporary files left
    broken_lines = [line for line in lines if "broken.nii.gz" in line]
    assert len(broken_lines) == 1 and "unreadable or truncated" in broken_lines[0]
    assert sum("cine_4d.nii.gz" in line and "4-D" in line for line in lines) == 1
    assert "1 input(s) failed" in final[-1]
    for src in frames:
        image, pred = nib.load(src), nib.load(out / src.name)
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-5)
        np.testing.assert_allclose(pred.header.get_zooms(), image.header.get_zooms(), atol=1e-5)
        labels = np.asanyarray(pred.dataobj)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_predict_folder_exit_code_zero_when_all_written(phantom_raw, run_dir, tmp_path):
    from sraseg.cli import main

    frame = _frames(phantom_raw)[0]
    out = tmp_path / "out"
    # -m also takes the weights file itself; one file also works as input
    assert main(["predict", "--input", str(frame), "--output", str(out), "--model", str(run_dir / "model.safetensors")]) == 0
    assert [p.name for p in out.iterdir()] == [frame.name]


def test_predict_refuses_to_write_over_its_inputs(phantom_raw, run_dir, capsys):
    from sraseg.cli import main

    folder = phantom_raw / "raw" / "patient003"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["predict", "-i", str(folder), "-o", str(folder), "-m", str(run_dir)]) == 1
    assert "output folder is the input folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_predict_missing_model_is_one_line(phantom_raw, tmp_path, capsys):
    from sraseg.cli import main

    code = main(["predict", "-i", str(phantom_raw / "raw" / "patient003"), "-o", str(tmp_path / "o"), "-m", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "model.safetensors" in err[0]


class Recorder(nn.Module):
    """Stand-in model that keeps every input batch (to compare with what training saw)."""

    def __init__(self):
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x):
        self.inputs.append(x.detach().float().cpu())
        return torch.zeros(len(x), 4, *x.shape[-2:])


def test_predict_folder_feeds_the_model_what_prepare_wrote(phantom_raw, tmp_path, monkeypatch):
    """Normalisation and resizing equal the prepare stage's: the model sees images.npy's slices."""
    from sraseg.datasets import prepare
    from sraseg.train import unet

    size = 24
    prepared = tmp_path / "prepared"
    splits = phantom_raw / "splits"
    prepare.run(phantom_raw / "raw", splits, splits / "labeled.txt", size, prepared)
    recorder = Recorder()
    monkeypatch.setattr(unet, "load_model", lambda path, device="cpu": (recorder, {"image_size": size}))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_bytes(b"")  # only its presence is checked before load_model

    frame = _frames(phantom_raw)[1]
    predict.run(tmp_path / "run", input_path=frame, out_dir=tmp_path / "out", batch_size=4, device="cpu")
    seen = torch.cat(recorder.inputs)[:, 0].numpy()

    slices = pd.read_parquet(prepared / "slices.parquet")
    rows = slices.index[slices["case"] == frame.name.removesuffix(".nii.gz")].to_numpy()
    images = np.load(prepared / "images.npy")[rows]
    assert seen.shape == images.shape and images.std() > 0.05
    np.testing.assert_allclose(seen, images, atol=1e-6)
