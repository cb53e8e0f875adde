"""The training methods: one table, `METHODS`, from a method's name (the config's `experiments.<name>.method`,
whose schema enum a test holds equal to this table) to the function giving its phases.

A phase is (name, iterations, step function). The loop runs the phases in order and knows only their
names: "selftrain" starts from the best weights of the phase before with a fresh EMA teacher (after the
switch guard); every other name trains the student alone. A step function takes the `TrainContext` and
returns its loss terms, float tensors on the device ("loss" is the one minimised; the others are logged,
see `log_table.term_columns`). Each method family is a module of its own: `labeled_only`, `bcp` (bcp_real
and bcp_synthetic, which differ only in the unlabeled pool `train/data.py` loads) and `sraseg`; what more
than one of them uses is in `shared`. CONTRIBUTING.md, "Adding a method", walks through adding one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sraseg.train.context import TrainContext
from sraseg.train.methods import bcp, labeled_only, sraseg
from sraseg.train.settings import TrainSettings

__all__ = ["METHODS", "Phase", "StepFn"]

StepFn = Callable[[TrainContext], dict[str, torch.Tensor]]
Phase = tuple[str, int, StepFn]

# method name -> its phases for the given settings (empty phases are dropped by the loop)
METHODS: dict[str, Callable[[TrainSettings], list[Phase]]] = {
    "labeled_only": labeled_only.phases,
    "bcp_real": bcp.phases,
    "bcp_synthetic": bcp.phases,
    "sraseg": sraseg.phases,
}
