"""The SRA-Seg FIVES protocol as split lists (`config/splits/fives/`), condition-balanced and seeded.

The reference code trains on a 560-image pool of the 800 FIVES images (56 labeled at 10 %, 28 at 5 %)
and holds out 240 for validation and test; its exact lists are not published. `protocol_splits`
draws such a split reproducibly from case ids (see its docstring for the rule); `run` writes the
lists, for the release on disk or for the published release's names (`release_case_ids`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from sraseg.data.fives import RELEASE_COUNTS, case_id, list_release, parse_case
from sraseg.data.fives_phantom import CONDITIONS, release_names
from sraseg.data.problems import raise_problems
from sraseg.errors import ConfigError
from sraseg.io import staged_outputs

__all__ = ["release_case_ids", "protocol_splits", "write_splits", "run"]

log = logging.getLogger(__name__)


def release_case_ids(train: int = RELEASE_COUNTS["train"], test: int = RELEASE_COUNTS["test"]) -> list[str]:
    """Case ids of a release with these counts, numbered in condition blocks (A, D, G, N) from 1 in
    each split, as we understand the published release and as the phantom writes them."""
    return [case_id(split, n, c) for split, count in (("train", train), ("test", test)) for n, c in release_names(count)]


def protocol_splits(
    cases: Iterable[str], pool_per_condition: int = 140, labeled_per_condition: tuple[int, ...] = (14, 7), seed: int = 0
) -> dict[str, list[str]]:
    """The SRA-Seg FIVES protocol as split lists, condition-balanced and seeded.

    1. For each condition, the release-train cases in number order are shuffled by
       `numpy.random.default_rng([seed, k])` (k the condition's index in A, D, G, N).
    2. The first `pool_per_condition` of that order form the training pool (`train`), the rest
       `val`. The release's test images are `test`, so no release-test image is ever trained on.
    3. `labeled_<n>` (n = per-condition count x number of conditions) takes the first k cases of
       each condition's pool order, so smaller labeled sets are nested in larger ones.
    With the release's 600/200 and the defaults: train 560, val 40, test 200, labeled_56 (10 %)
    and labeled_28 (5 %), every list with equal counts per condition. Lists are sorted by
    (condition, number).

    Raises:
        ConfigError: a malformed case id, a pool that leaves a condition without val cases, or a
        labeled count above the pool.
    """
    parsed = [parse_case(c) for c in cases]
    by_cond: dict[str, list[int]] = {}
    test = []
    for split, number, cond in parsed:
        if split == "train":
            by_cond.setdefault(cond, []).append(number)
        else:
            test.append((cond, number))
    if not by_cond or not test:
        raise ConfigError("protocol splits need release train and test cases")
    pool: dict[str, list[int]] = {}
    out: dict[str, list[str]] = {"train": [], "val": []}
    for cond in sorted(by_cond, key=CONDITIONS.index):
        numbers = sorted(by_cond[cond])
        if not 1 <= pool_per_condition < len(numbers):
            raise ConfigError(f"pool_per_condition {pool_per_condition} must be in [1, {len(numbers) - 1}] "
                              f"(condition {cond} has {len(numbers)} release-train images)")  # fmt: skip
        rng = np.random.default_rng([seed, CONDITIONS.index(cond)])
        order = [numbers[i] for i in rng.permutation(len(numbers))]
        pool[cond] = order[:pool_per_condition]
        out["train"] += [case_id("train", n, cond) for n in sorted(order[:pool_per_condition])]
        out["val"] += [case_id("train", n, cond) for n in sorted(order[pool_per_condition:])]
    out["test"] = [case_id("test", n, c) for c, n in sorted(test, key=lambda t: (CONDITIONS.index(t[0]), t[1]))]
    for k in labeled_per_condition:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= pool_per_condition:
            raise ConfigError(f"labeled_per_condition {k!r} must be an integer in [1, {pool_per_condition}]")
        out[f"labeled_{k * len(pool)}"] = [case_id("train", n, c) for c in pool for n in sorted(pool[c][:k])]
    return out


def write_splits(splits: dict[str, list[str]], out_dir: Path | str, header: str) -> None:
    """Write each list as `<name>.txt` (one case id a line, `header` as `#` comment lines); all or nothing."""
    with staged_outputs(out_dir) as st:
        for name, ids in splits.items():
            comment = "".join(f"# {line}\n" for line in header.splitlines())
            st.path(f"{name}.txt").write_text(comment + "".join(f"{case}\n" for case in ids))


def run(
    out_dir: Path, raw_dir: Path | None = None, pool_per_condition: int = 140,
    labeled_per_condition: tuple[int, ...] = (14, 7), seed: int = 0,
    release_train: int = RELEASE_COUNTS["train"], release_test: int = RELEASE_COUNTS["test"],
) -> None:  # fmt: skip
    """Write the protocol's split lists for the release on disk (`raw_dir`, checked by name only)
    or, without it, for a release of `release_train` / `release_test` images named as the
    published one (`release_case_ids`: 600 / 200 by default; the phantom names its files the same way).

    Raises:
        DatasetError: layout problems of `raw_dir`; ConfigError: see `protocol_splits`.
    """
    pool = f"--pool-per-condition {pool_per_condition} --labeled-per-condition {' '.join(map(str, labeled_per_condition))} --seed {seed}"
    if raw_dir is not None:
        records, problems = list_release(raw_dir)
        if problems:
            raise_problems(problems)
        cases = list(records)
        header = f"sraseg fives-splits --raw-dir {Path(raw_dir).name} {pool}"
    else:
        cases = release_case_ids(release_train, release_test)
        header = f"sraseg fives-splits --release-train {release_train} --release-test {release_test} {pool}"
    splits = protocol_splits(cases, pool_per_condition, tuple(labeled_per_condition), seed)
    header = f"FIVES protocol split, written by:\n  {header}\nsee config/splits/fives/README.md"
    write_splits(splits, out_dir, header)
    log.info("wrote %s: %s", out_dir, ", ".join(f"{name} {len(ids)}" for name, ids in splits.items()))
