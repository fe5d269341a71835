"""Snapshot files: node-local storage, and an optional persistent copy.

A snapshot is the bytes of one ``torch.save`` of ``{"format", "step", "epoch", "fingerprint",
"states"}`` (see ``state``). On disk it is ``snapshot-<step, 12 digits>.pt`` in a directory,
written to a temporary name and renamed, so a reader never sees half a file; the newest
``keep`` files are kept (by step number, so an older write that lands late never displaces a
newer one). ``newest(dir)`` returns the highest step found. A writer killed mid-write leaves
only a ``.snapshot-*.tmp`` file, which no reader looks at; ``clean_temp(dir)`` removes them
(the job does it before it writes again).

Directories
- node-local: ``ADAPTRUN_SNAPSHOT_DIR``, else ``<tmp>/adaptrun-<run id>`` (one per job and node;
  nothing assumes another node can read it).
- persistent: ``ADAPTRUN_CHECKPOINT_DIR`` when set (for a restart of the whole job).
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

__all__ = ["local_dir", "persistent_dir", "write", "newest", "list_all", "read", "clear",
           "set_aside", "clean_temp"]

_NAME = re.compile(r"^snapshot-(\d{12})\.pt$")


def local_dir(run_id: str) -> Path:
    explicit = os.environ.get("ADAPTRUN_SNAPSHOT_DIR")
    if explicit:
        return Path(explicit)
    return Path(tempfile.gettempdir()) / f"adaptrun-{run_id}"


def persistent_dir() -> Path | None:
    value = os.environ.get("ADAPTRUN_CHECKPOINT_DIR")
    return Path(value) if value else None


def write(directory: Path, step: int, data, keep: int = 2) -> Path:
    """Write one snapshot atomically; drop all but the newest ``keep``. ``data``: its bytes,
    or a function that writes them into the open file (a snapshot streamed from a background
    thread: the file writes release the GIL, a build in memory first would hold it)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"snapshot-{step:012d}.pt"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".snapshot-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for _, old in _list(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def clean_temp(directory: Path | None) -> int:
    """Remove the temporary files of writes that never finished (a process killed mid-write);
    call it only where no write to ``directory`` is in flight. Returns how many it removed."""
    if directory is None or not directory.is_dir():
        return 0
    removed = 0
    for p in directory.glob(".snapshot-*.tmp"):
        try:
            p.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def _list(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def newest(directory: Path | None) -> tuple[int, Path] | None:
    if directory is None:
        return None
    found = _list(directory)
    return found[-1] if found else None


def list_all(directory: Path | None) -> list[tuple[int, Path]]:
    """Every (step, path) snapshot in ``directory``, oldest first."""
    return [] if directory is None else _list(directory)


def set_aside(path: Path) -> None:
    """Rename an unreadable snapshot to ``<name>.corrupt``: kept for a look, never restored."""
    try:
        os.replace(path, Path(path).with_name(Path(path).name + ".corrupt"))
    except OSError:
        pass


def read(path: Path) -> bytes:
    return Path(path).read_bytes()


def clear(directory: Path) -> None:
    for _, p in _list(directory):
        p.unlink(missing_ok=True)
