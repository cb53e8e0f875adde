"""The datasets the stages know, in one table: `--dataset NAME` (and the workflow's `dataset.source`)
picks a module that implements `sraseg.datasets.base.Dataset`. Adding a dataset is adding a module and
a row here (see CONTRIBUTING.md, "Adding a dataset").

The table names modules rather than importing them, so choosing one does not load the others' readers.
"""

from __future__ import annotations

import importlib

from sraseg.errors import ConfigError

__all__ = ["DATASETS", "PHANTOMS", "dataset_of_source", "get_dataset"]

# name -> the module whose `DATASET` implements the interface
DATASETS = {
    "acdc": "sraseg.datasets.acdc",  # ACDC layout: NIfTI volumes, 4 classes
    "fives": "sraseg.datasets.fives",  # FIVES layout: fundus PNGs, background and vessel
}
# the workflow's built-in phantom sources -> the layout they write
PHANTOMS = {"phantom": "acdc", "fives_phantom": "fives"}


def dataset_of_source(source: str) -> str:
    """The dataset name of a config's `dataset.source` (a phantom's source names the layout it writes)."""
    return PHANTOMS.get(source, source)


def get_dataset(name: str):
    """The `Dataset` of `name`.

    Raises:
        ConfigError: `name` is not in the table (the message lists the names that are).
    """
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; one of {', '.join(DATASETS)}")
    return importlib.import_module(DATASETS[name]).DATASET
