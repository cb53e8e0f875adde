"""Real-pool stage: the real unlabeled training slices written as an unlabeled image set in the sample
stage's layout, so that embed, index, blend and SRA-Seg training run on them unchanged in place of
the synthetic images (`train.unlabeled: real`, the `sraseg_real` experiment).

It separates the method from the data: SRA-Seg on real unlabeled slices against BCP on the same
slices (bcp_real) says whether the training step is sound whatever the generator gives.

Outputs: images.npy float32 [M,S,S] in [0,1] (the prepared slices, bit for bit), synthetic.parquet
(synthetic_id == row, the name every reader of an unlabeled set expects, and slice_id: the prepared
row it came from), pool.json.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from sraseg.errors import DatasetError
from sraseg.io import load_array, portable_path, read_table, staged_outputs, write_json

__all__ = ["run"]

log = logging.getLogger(__name__)


def run(prepared_dir: Path | str, out_dir: Path | str) -> None:
    """Copy the prepared train split's unlabeled slices into out_dir as images.npy + synthetic.parquet.

    Raises:
        DatasetError: the prepared folder is incomplete or has no unlabeled training slice.
    """
    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    hint = "run the prepare stage first"
    slices = read_table(prepared_dir / "slices.parquet", ("slice_id", "split", "labeled"), hint)
    images = load_array(prepared_dir / "images.npy", hint)
    if len(slices) != len(images):
        raise DatasetError(f"{prepared_dir / 'slices.parquet'}: {len(slices)} rows but images.npy holds {len(images)}")
    rows = slices.loc[(slices["split"] == "train") & ~slices["labeled"].astype(bool), "slice_id"].to_numpy(np.int64)
    if len(rows) == 0:
        raise DatasetError(f"{prepared_dir / 'slices.parquet'}: no unlabeled training slices (every train patient is labeled)")
    with staged_outputs(out_dir) as staged:
        np.save(staged.path("images.npy"), np.ascontiguousarray(images[rows], dtype=np.float32))
        pd.DataFrame({"synthetic_id": np.arange(len(rows), dtype=np.int64), "slice_id": rows}).to_parquet(
            staged.path("synthetic.parquet"), index=False
        )
        write_json(staged.path("pool.json"), {"source": "real_unlabeled", "prepared_dir": portable_path(prepared_dir),
                                              "n_images": len(rows), "image_size": int(images.shape[-1])})
    log.info("real pool: %d unlabeled training slices -> %s", len(rows), out_dir)
