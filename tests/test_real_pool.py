"""The real-pool stage (train.unlabeled: real): the unlabeled training slices in the sample stage's
layout, read unchanged by the blend and train stages."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from train_fixtures import TINY, make_blend, make_embed, make_prepared

from sraseg.data import real_pool
from sraseg.errors import DatasetError
from sraseg.train import loop


def test_pool_holds_exactly_the_unlabeled_training_slices(tmp_path):
    prepared = make_prepared(tmp_path)
    real_pool.run(prepared, tmp_path / "pool")
    slices = pd.read_parquet(prepared / "slices.parquet")
    expected = slices.loc[(slices["split"] == "train") & ~slices["labeled"], "slice_id"].to_numpy()
    assert len(expected) == 6  # patient003, the fixture's one unlabeled training patient
    table = pd.read_parquet(tmp_path / "pool" / "synthetic.parquet")
    assert table["synthetic_id"].tolist() == list(range(6))
    assert table["slice_id"].tolist() == expected.tolist()
    pool = np.load(tmp_path / "pool" / "images.npy")
    assert pool.dtype == np.float32 and pool.std() > 0
    np.testing.assert_array_equal(pool, np.load(prepared / "images.npy")[expected])


def test_no_unlabeled_slices_is_one_error_and_no_output(tmp_path):
    prepared = make_prepared(tmp_path)
    slices = pd.read_parquet(prepared / "slices.parquet")
    slices.loc[slices["split"] == "train", "labeled"] = True
    slices.to_parquet(prepared / "slices.parquet")
    with pytest.raises(DatasetError, match="no unlabeled training slices"):
        real_pool.run(prepared, tmp_path / "pool")
    assert not (tmp_path / "pool").exists()


def test_sraseg_trains_on_the_pool_in_place_of_synthetic_images(tmp_path):
    prepared = make_prepared(tmp_path)
    pool = tmp_path / "pool"
    real_pool.run(prepared, pool)
    embed = make_embed(tmp_path, prepared, pool)
    out = loop.run(prepared_dir=prepared, synthetic_dir=pool, embed_dir=embed,
                   blend_dir=make_blend(tmp_path, prepared, pool, embed=embed), out_dir=tmp_path / "run",
                   settings=dict(TINY, method="sraseg", unlabeled="real"), seed=5)
    log = pd.read_csv(out / "train_log.csv")
    selftrain = log[log["phase"] == "selftrain"]
    assert len(selftrain) and np.isfinite(selftrain["loss"]).all() and np.isfinite(selftrain["sa_loss"]).all()
