"""Writing files safely: atomic replacement, the usual (umask) permissions, and output-folder checks
made before any model work.

``atomic_path(path)`` yields a temp path beside ``path``; on success it is given the permissions a new
file gets (0666 minus the umask; some writers such as safetensors create 0600 files) and renamed over
``path``, so readers never see half a file; on failure the temp file is removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from explainprune.errors import InputError

MIN_FREE_BYTES = 16 * 2**20  # an output folder with less free space than this is refused up front


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fix_mode(path: str | Path) -> None:
    """Give ``path`` the permissions a newly created file gets (0666 & ~umask)."""
    os.chmod(path, 0o666 & ~_umask())


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk (or the quota) is full; pyarrow's errors carry no errno, only the text."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(err) or "Disk quota exceeded" in str(err)


def disk_full(path: str | Path) -> InputError:
    """The error for a write that failed on a full disk, naming the file."""
    return InputError(f"the disk is full: could not write {path}",
                      hint="free some space and rerun the same command (finished work is kept and resumed)")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path to write; renamed over ``path`` (usual permissions) when the block succeeds. A full disk
    raises ``disk_full(path)`` (nothing half-written is left)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fix_mode(tmp)
        os.replace(tmp, path)
    except Exception as err:
        if is_disk_full(err):
            raise disk_full(path) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def file_stamp(path: str | Path) -> str:
    """A cheap identity of a file, from ``os.stat`` only: its size and modification time ("missing" if
    absent). Media files are stamped with it (label resume, dataset digests)."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temp file and a rename (readers never see half a file)."""
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def check_out_dir(path: str | Path, flag: str = "--out", min_free: int = MIN_FREE_BYTES) -> Path:
    """Make sure ``path`` can be an output folder before any work: not a file, creatable, writable, with
    ``min_free`` bytes free. Creates it; raises InputError naming it otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path} is a file, not a folder", hint="give a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as err:
        reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise InputError(f"cannot write to {flag} {path} ({reason})",
                         hint="choose a writable folder with free space") from None
    free = shutil.disk_usage(path).free
    if free < min_free:
        raise InputError(f"{flag} {path} has only {free // 2**20} MiB free (at least {min_free // 2**20} MiB "
                         "needed)", hint="free some space or choose another folder")
    return path


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """Like ``check_out_dir`` for a file to be written: ``path`` is not a folder, its folder is writable."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder, not a file name", hint="give a file name such as fig.png")
    check_out_dir(path.parent if str(path.parent) else Path("."), flag=f"the folder of {flag}")
    return path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (label shards, compressor weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
