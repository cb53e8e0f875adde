"""The paths between stages: prepare keeps each image aligned with its label, and predict gives the model
exactly what prepare made of the same case.

The phantom's images are replaced by one intensity per class (not monotone in the class index), so a
label can be read off its image: a label moved, flipped or resampled differently from its image shows.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from helpers_data import make_phantom, write_splits
from torch import nn

from sraseg.datasets import prepare
from sraseg.evaluate import predict
from sraseg.train import unet

SIZE = 40  # the phantom's 136-176 px slices shrink by 3.4-4.4: no integer factor hides an offset
RAW_LEVELS = np.array([50, 900, 400, 650], np.int16)  # background, RV, MYO, LV


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    raw = make_phantom(root, patients=3, seed=7)
    for gt_path in sorted(raw.glob("*/*_gt.nii.gz")):
        image_path = gt_path.with_name(gt_path.name.replace("_gt", ""))
        image = nib.load(image_path)
        label = np.asanyarray(nib.load(gt_path).dataobj)
        nib.save(nib.Nifti1Image(RAW_LEVELS[label], image.affine, image.header), image_path)
    splits_dir, labeled = write_splits(root, ["patient001"], ["patient002"], ["patient003"], ["patient001"])
    out = root / "prepared"
    prepare.run(raw, splits_dir, labeled, SIZE, out)
    return raw, out


def _nearest(n: int) -> np.ndarray:
    """Source index of each of the SIZE output pixels: the pixel-centre rule (PyTorch's nearest-exact)."""
    return np.minimum(np.floor((np.arange(SIZE) + 0.5) * n / SIZE).astype(int), n - 1)


def test_prepared_labels_are_the_nearest_source_labels(dataset):
    """Labels are sampled, never interpolated: each prepared label is the source label at the nearest
    pixel centre (checked on the foreground, where a mistake would hide among background voxels)."""
    _, prepared = dataset
    labels = np.load(prepared / "labels.npy")
    volumes = pd.read_parquet(prepared / "volumes.parquet")
    for row in volumes.itertuples():
        source = np.asanyarray(nib.load(row.gt_path).dataobj)
        want = np.moveaxis(source[_nearest(row.nx)][:, _nearest(row.ny)], 2, 0)
        got = labels[row.first_slice_id : row.first_slice_id + row.nz]
        foreground = (want > 0) | (got > 0)
        assert foreground.sum() > 100
        assert (got == want)[foreground].mean() > 0.995, f"{row.case}: {(got == want)[foreground].mean():.2%}"


def test_prepared_images_follow_their_labels(dataset):
    """On the foreground, the prepared image holds the normalised intensity of the prepared label's class
    except where the bilinear resize mixes two classes at a boundary: 85% of the pixels here, against at
    most 66% for a label shifted by one pixel and 35-48% for one flipped or transposed."""
    _, prepared = dataset
    images, labels = np.load(prepared / "images.npy"), np.load(prepared / "labels.npy")
    levels = (RAW_LEVELS - RAW_LEVELS.min()) / (RAW_LEVELS.max() - RAW_LEVELS.min())
    on_level = np.abs(images - levels[labels]) < 1e-5
    for c in (1, 2, 3):
        assert (labels == c).sum() > 100
        assert on_level[labels == c].mean() > 0.75, f"class {c}: {on_level[labels == c].mean():.1%}"
    assert on_level[labels > 0].mean() > 0.8, f"{on_level[labels > 0].mean():.1%}"


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.seen: list[np.ndarray] = []

    def forward(self, x):
        self.seen.append(x[:, 0].detach().cpu().numpy().copy())
        return torch.zeros(len(x), 4, *x.shape[2:])


@pytest.mark.parametrize("split", ["val", "test"])
def test_predict_feeds_the_model_the_prepared_slices(split, dataset, tmp_path, monkeypatch):
    _, prepared = dataset
    model = Recorder()
    monkeypatch.setattr(unet, "load_model", lambda path, device="cpu": (model, {"image_size": SIZE}))
    (tmp_path / "model.safetensors").touch()  # load_model is replaced; the file must only exist
    predict.run(tmp_path / "model.safetensors", prepared, split, tmp_path / "out", batch_size=5)
    slices = pd.read_parquet(prepared / "slices.parquet")
    want = np.load(prepared / "images.npy")[(slices["split"] == split).to_numpy()]
    got = np.concatenate(model.seen)
    assert got.shape == want.shape and len(model.seen) > 2
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 2
