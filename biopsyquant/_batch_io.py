"""Batch output plumbing: output-folder lock, file hashes, per-slide parts, table merges.

Every file is written atomically (temporary file in the same folder, then ``os.replace``), so a
reader, a crash or Ctrl-C never leaves a half-written file. Per-slide results go to
``DIR/.parts/<key>.*``; the ``.json`` part is written last and is the commit marker of a slide.
The tables in ``DIR`` are rebuilt from the parts.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._atomic import atomic_write as _atomic_write
from .errors import BiopsyQuantError, InputError

PARTS = ".parts"
LOCK = ".biopsyquant.lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()


def atomic_write(path: str | Path, write) -> Path:
    """Atomic write (temp file + ``os.replace``) leaving normal permissions (0666 & ~umask),
    so outputs on a shared folder stay readable by the group."""

    def _write(tmp: Path) -> None:
        write(tmp)
        os.chmod(tmp, _MODE)

    return _atomic_write(path, _write)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


class OutputLockedError(BiopsyQuantError):
    """Another run is writing into the same output folder."""


# --------------------------------------------------------------------------------------
# lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class OutputLock:
    """Exclusive lock on an output folder: ``DIR/.biopsyquant.lock`` holding pid and host.

    A lock left by a dead process on this host is taken over (the run that held it was
    killed); a live holder, or a holder on another host, makes :meth:`acquire` raise
    :class:`OutputLockedError` with a message saying how to proceed.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK
        self.held = False
        self.stale_taken: dict | None = None

    def _info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(),
                "started": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}

    def acquire(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # being written right now, or garbage: look again
                    time.sleep(0.2)
                    holder = self._read()
                if holder is not None and self._alive(holder):
                    raise OutputLockedError(
                        f"output folder {self.path.parent} is in use by another biopsyquant run "
                        f"(pid {holder.get('pid')} on {holder.get('host')}, started "
                        f"{holder.get('started')}); wait for it to finish or choose another "
                        f"--out. If that run no longer exists, delete {self.path}") from None
                # stale lock of a dead run: remove it and try again
                self.stale_taken = holder or {}
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(self._info(), fh)
            self.held = True
            return self
        raise OutputLockedError(f"could not lock output folder {self.path.parent}: another run "
                                "keeps creating the lock file")

    def _read(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) and "pid" in data else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def _alive(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return True  # cannot check a process on another machine: assume it runs
        try:
            pid = int(holder["pid"])
        except (KeyError, TypeError, ValueError):
            return False
        return pid != os.getpid() and _pid_alive(pid)

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if holder is not None and holder.get("pid") == os.getpid():
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            self.held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------------------
# hashing and JSON


def file_sha256(path: str | Path, chunk: int = 8 << 20) -> str:
    """SHA-256 (hex) of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def jsonable(v: Any) -> Any:
    """Convert numpy scalars/arrays, NaN and paths to plain JSON values (NaN -> None)."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, np.bool_ | bool):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating | float):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, Path):
        return str(v)
    if v is pd.NA or v is pd.NaT:
        return None
    return v


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(jsonable(data), indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | Path) -> Any | None:
    """Parsed JSON, or None when missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_table(path: str | Path, df: pd.DataFrame, *, parquet: bool = False) -> None:
    """Write ``df`` as CSV (or Parquet) atomically."""
    path = Path(path)
    if parquet:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError("Parquet output needs pyarrow: pip install 'biopsyquant[parquet]'"
                             ) from None
        atomic_write(path, lambda p: df.to_parquet(p, index=False))
    else:
        atomic_write(path, lambda p: df.to_csv(p, index=False, lineterminator="\n"))


# --------------------------------------------------------------------------------------
# parts


def part_stem(name: str, marker: str) -> str:
    """File-system-safe stem of a slide's parts: ``<name>__<marker>``."""
    safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in f"{name}__{marker}")
    return safe.lstrip(".") or "slide"


def parts_dir(out: str | Path) -> Path:
    return Path(out) / PARTS


def list_parts(out: str | Path) -> dict[str, dict]:
    """stem -> parsed part JSON of every committed slide part."""
    d = parts_dir(out)
    found = {}
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            if p.name.startswith("."):
                continue
            data = read_json(p)
            if isinstance(data, dict) and "row" in data:
                found[p.stem] = data
    return found


def write_part(out: str | Path, stem: str, *, record: dict, cells: pd.DataFrame | None,
               fibers: pd.DataFrame | None) -> None:
    """Commit one slide: tables first, then the JSON record (the commit marker)."""
    d = parts_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    for kind, df in (("cells", cells), ("fibers", fibers)):
        p = d / f"{stem}.{kind}.csv"
        if df is not None:
            write_table(p, df)
        else:
            p.unlink(missing_ok=True)
    write_json(d / f"{stem}.json", record)


def remove_part(out: str | Path, stem: str) -> None:
    d = parts_dir(out)
    for suffix in (".json", ".cells.csv", ".fibers.csv"):
        (d / f"{stem}{suffix}").unlink(missing_ok=True)


def _csv_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as fh:
        return next(csv.reader(fh), [])


def _ordered_union(lists: Iterable[list[str]], first: list[str]) -> list[str]:
    cols = list(first)
    seen = set(cols)
    for lst in lists:
        for c in lst:
            if c not in seen:
                cols.append(c)
                seen.add(c)
    return cols


def merge_object_tables(out: str | Path, stems: list[str], kind: str, *, lead: list[str],
                        parquet: bool = False) -> int:
    """Rebuild ``DIR/<kind>.csv`` from the parts of ``stems`` (input order), streaming.

    Columns are the union over slides (``lead`` columns first); a slide without a column gets
    empty cells. Returns the number of rows written.
    """
    d = parts_dir(out)
    files = [d / f"{s}.{kind}.csv" for s in stems]
    files = [f for f in files if f.is_file()]
    headers = [_csv_header(f) for f in files]
    cols = _ordered_union(headers, list(lead))
    target = Path(out) / f"{kind}.csv"
    n = 0

    def write(tmp: Path) -> None:
        nonlocal n
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(cols)
            for f, h in zip(files, headers, strict=True):
                pos = [h.index(c) if c in h else -1 for c in cols]
                with open(f, newline="", encoding="utf-8") as src:
                    r = csv.reader(src)
                    next(r, None)
                    for row in r:
                        w.writerow([row[i] if i >= 0 else "" for i in pos])
                        n += 1

    atomic_write(target, write)
    if parquet:
        pq = target.with_suffix(".parquet")
        if n:
            df = pd.read_csv(target, low_memory=False)
        else:
            df = pd.DataFrame(columns=cols)
        write_table(pq, df, parquet=True)
    return n
