"""The key that ties a resume checkpoint to one job: its resolved settings, seed and input files.

A checkpoint whose key differs from the current job's was written by another job (other settings,
other inputs) and is not resumed; the stage starts fresh instead.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["file_identity", "input_identity", "job_key"]

# Files up to this size are identified by content (a copied or touched file keeps its key); larger
# ones by size and modification time, which every rewrite of a stage's output changes.
CONTENT_HASH_BYTES = 1 << 20


def file_identity(path: Path) -> list:
    """[path, size, sha256 of the content] for small files, [path, size, mtime_ns] otherwise; the path resolved,
    and relative to the working directory when under it (a working directory copied elsewhere resumes)."""
    from sraseg.io import portable_path  # here, not at the top: the train stage imports nothing beyond torch

    st = path.stat()
    name = portable_path(path.resolve())
    if st.st_size <= CONTENT_HASH_BYTES:
        return [name, st.st_size, hashlib.sha256(path.read_bytes()).hexdigest()]
    return [name, st.st_size, st.st_mtime_ns]


def input_identity(*paths: Path | str | None) -> list:
    """Identity of every file in the given files or folders (recursively; hidden names, i.e. staging
    folders of an unfinished stage, skipped). None entries are skipped."""
    found = []
    for given in paths:
        if given is None:
            continue
        root = Path(given)
        if root.is_file():
            found.append(file_identity(root))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [file_identity(Path(dirpath) / f) for f in sorted(filenames) if not f.startswith(".")]
    return found


def job_key(settings: dict[str, Any], inputs: list | None = None, **extra: Any) -> str:
    """sha256 over settings, input identities and any `extra` values (seed, format version...)."""
    blob = json.dumps(dict(settings=settings, inputs=inputs or [], **extra), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
