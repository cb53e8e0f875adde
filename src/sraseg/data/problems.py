"""A dataset reader's problems, collected while checking and raised as one line (cf. nnU-Net's
`verify_dataset_integrity`): every file and what is wrong with it, not only the first."""

from __future__ import annotations

from collections.abc import Iterator

from sraseg.errors import DatasetError

__all__ = ["raise_problems", "check_split_owners"]

_MAX_LISTED = 25  # problems named in one error message; the rest are counted


def raise_problems(problems: list[str]) -> None:
    """Raise one DatasetError listing the problems (the first 25 named, the rest counted)."""
    shown = problems[:_MAX_LISTED]
    more = len(problems) - len(shown)
    tail = f"; ... and {more} more problem(s)" if more else ""
    raise DatasetError(f"{len(problems)} dataset problem(s): " + "; ".join(shown) + tail)


def check_split_owners(splits: dict[str, list[str]], where, word: str, problems: list[str]) -> Iterator[tuple[str, str]]:
    """Yield (split, id) of every listed id in split order; an id listed in two splits is a problem
    ("<where(id)>: <word> listed in both 'train' and 'test' splits", appended as it is met) and is
    yielded in its first split only."""
    owner: dict[str, str] = {}
    for split, ids in splits.items():
        for name in ids:
            if name in owner:
                problems.append(f"{where(name)}: {word} listed in both '{owner[name]}' and '{split}' splits")
                continue
            owner[name] = split
            yield split, name
