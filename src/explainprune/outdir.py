"""Guarding an output folder (``--out``) for the run that writes it.

``claim_out(out, command, kind)`` (label, train, eval, demo) checks the folder (``files.check_out_dir``),
refuses one that holds another command's output (``out_kind``), and takes an exclusive lock on
``OUT/.explainprune.lock`` (``fcntl.flock``, which the kernel drops when the process ends, however it ends:
a lock file left by a killed run is not in the way). The lock file holds the holder's pid and command
line, so a second run on the same folder stops with one line naming it. On exit the lock file is removed;
after an error, a folder this run created and left empty is removed too.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from explainprune.errors import InputError
from explainprune.files import check_out_dir

LOCK_NAME = ".explainprune.lock"
KINDS = {"labels": "a label set (written by `explainprune label`)",
         "train": "a training run (written by `explainprune train`)",
         "eval": "an evaluation (written by `explainprune eval`)",
         "demo": "a demo run (written by `explainprune demo`)"}


def out_kind(out: str | Path) -> str | None:
    """Which command's output ``out`` holds: "labels", "train", "eval", "demo", or None."""
    out = Path(out)
    run = out / "run.json"
    if run.is_file():
        try:
            if json.loads(run.read_text()).get("format") == "explainprune-labels":
                return "labels"
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
            pass
    if (out / "index.json").is_file() or (out / "shards").is_dir():
        return "labels"
    if (out / "checkpoint.json").is_file() or (out / "checkpoints").is_dir():
        return "train"
    if (out / "records.jsonl").is_file() or (out / "report.json").is_file():
        return "eval"
    if (out / "labels" / "run.json").is_file() or (out / "eval" / "records.jsonl").is_file():
        return "demo"
    return None


def check_out_kind(out: str | Path, kind: str, flag: str = "--out") -> None:
    """InputError when ``out`` holds the output of another command than ``kind``."""
    found = out_kind(out)
    if found is not None and found != kind:
        raise InputError(f"{flag} {out} holds {KINDS[found]}", hint="choose another --out")


def lock_owner(out: str | Path) -> str:
    """The pid and command line written in ``out``'s lock file ("" when none)."""
    try:
        return (Path(out) / LOCK_NAME).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


@contextmanager
def out_lock(out: str | Path, command: str, flag: str = "--out") -> Iterator[Path]:
    """Hold an exclusive lock on ``out`` for the block; InputError naming the holder when another process
    holds it. Where the filesystem has no locks (ENOLCK, some network mounts) the block runs unlocked."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield Path(out)
        return
    path = Path(out) / LOCK_NAME
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                owner = lock_owner(out) or "pid unknown"
                raise InputError(f"{flag} {out} is in use by another run ({owner})",
                                 hint="wait for it to finish, or choose another --out") from None
            yield Path(out)  # no locks on this filesystem
            return
        try:  # the file may have been removed by its last holder between our open and our lock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}: {command}\n".encode())
        yield Path(out)
    finally:
        path.unlink(missing_ok=True)  # still holding the lock: nobody else can have it
        os.close(fd)


def _missing_parents(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    return missing


@contextmanager
def claim_out(out: str | Path, command: str, kind: str, *, lock: bool = True, flag: str = "--out") -> Iterator[Path]:
    """Check ``out`` (writable, free space, not another command's output), lock it (``lock``), and run the
    block; after an error, the folders this call created are removed again if they are still empty."""
    out = Path(out)
    created = _missing_parents(out.absolute())
    try:
        check_out_dir(out, flag=flag)
        check_out_kind(out, kind, flag=flag)
        if lock:
            with out_lock(out, command, flag=flag):
                yield out
        else:
            yield out
    except BaseException:
        for p in created:
            try:
                p.rmdir()  # only an empty folder
            except OSError:
                break
        raise
