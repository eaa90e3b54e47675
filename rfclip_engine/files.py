"""Files that must never be read half written, folders of files kept up to a size, least
recently used first out (`rfclip segment`'s pictures and run record, the command's text
embeddings, and the backend's fetched images), and the digest of files' contents (weights,
examples)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Optional


def write_whole(path: Path, write: Callable[[Path], object], part: Optional[Path] = None) -> None:
    """`write(part)`, then the part renamed to `path`: a process killed mid-write leaves no
    truncated file that a later run would take for done or could not read. `part` defaults to
    `.NAME.part` beside it, which a later write of the same file replaces; writers that may meet
    (processes sharing a cache) each name their own."""
    part = part if part is not None else path.with_name(f".{path.name}.part")
    try:
        write(part)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def prune_cache(folder: Path, max_bytes: int, keep_fraction: float = 0.8) -> int:
    """Delete the least recently used files of `folder` until it holds at most keep_fraction *
    max_bytes, once it holds more than max_bytes. Returns how many files were deleted."""
    entries = []
    for path in folder.iterdir():
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if path.is_file():
            entries.append((stat.st_mtime, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    if total <= max_bytes:
        return 0
    removed = 0
    for _, size, path in sorted(entries):
        path.unlink(missing_ok=True)
        removed += 1
        total -= size
        if total <= keep_fraction * max_bytes:
            break
    return removed


def content_digest(path: Path) -> str:
    """`sha256-` and 16 hex digits of the file's bytes: the same contents give the same digest
    wherever they lie and whatever their times."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return f"sha256-{digest.hexdigest()[:16]}"
