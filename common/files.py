"""Files that hold secrets or patient-derived data: created private, never widened, never replaced by surprise.

A new file is created with its final mode in the same system call that creates it
(``O_CREAT | O_EXCL | O_NOFOLLOW``), so there is no moment at which another user could open
a private one, and neither an existing file nor a symbolic link is ever written through. A
private folder is 0700 and owned by the user running FedLesion; one that another user owns,
or that others could write to (its contents could have been swapped or planted), is refused
rather than trusted.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

PRIVATE_FILE_MODE = 0o600
PUBLIC_FILE_MODE = 0o644
PRIVATE_FOLDER_MODE = 0o700
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def safe_label(name: str, limit: int = 64) -> str:
    """``name`` reduced to ASCII letters, digits, ``.``, ``_`` and ``-`` (others become ``_``), at most ``limit``
    characters: a site's claimed name as it may appear in file names, logs and CSV columns ("" for none)."""
    return "".join(ch if ch.isascii() and (ch.isalnum() or ch in "._-") else "_" for ch in name[:limit])


def write_new(path: str | os.PathLike[str], data: bytes, mode: int = PRIVATE_FILE_MODE) -> Path:
    """Create ``path`` with ``mode`` (default 0600) and write ``data``; an existing file or link is an error.

    Raises:
        FileExistsError: naming the file, when it (or a link by that name) exists; nothing is written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, mode)
    except FileExistsError:
        raise FileExistsError(f"{path} exists; it is never overwritten (move it away first).") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return path


def write_private(path: str | os.PathLike[str], data: bytes) -> Path:
    """:func:`write_new` with mode 0600: for private keys."""
    return write_new(path, data, PRIVATE_FILE_MODE)


def replace_private(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` atomically with mode 0600: a private temporary file in the same folder,
    then a rename over ``path`` (for files a run rewrites: checkpoints, case lists, reports).

    Args:
        path: the file to (re)write.
        data: its bytes, or a function that writes them to an open binary file (so a large
            checkpoint is not held in memory twice).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # created 0600
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def private_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder only its owner can use: created with mode 0700, or, if it exists,
    checked to be a real folder owned by this user that no one else can write to, and narrowed
    to 0700 (others' read access removed).

    Raises:
        PermissionError: naming the folder, when it is a link or a file, another user owns it,
            or its group or others may write to it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=PRIVATE_FOLDER_MODE)
    except FileExistsError:
        pass
    try:  # checked and narrowed through one descriptor: the folder cannot be swapped in between
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | NOFOLLOW)
    except OSError:
        raise PermissionError(f"{path} must be a folder, not a link or a file; refusing to use it.") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.getuid():
            raise PermissionError(f"{path} is owned by user {info.st_uid}, not by this user ({os.getuid()}); "
                                  "refusing to keep private data in it. Use a folder of your own.")
        if info.st_mode & 0o022:
            raise PermissionError(f"{path} can be written by its group or by others (mode "
                                  f"{stat.S_IMODE(info.st_mode):o}), so its contents cannot be trusted; "
                                  "empty it and make it private (chmod 700), or use a new folder.")
        if stat.S_IMODE(info.st_mode) != PRIVATE_FOLDER_MODE:
            os.fchmod(fd, PRIVATE_FOLDER_MODE)
    finally:
        os.close(fd)
    return path


def open_private(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a file for reading only if it is a regular file this user owns that no one else may write.

    Raises:
        PermissionError: naming the file otherwise (a link, another owner, group- or world-writable).
        FileNotFoundError: when it does not exist.
    """
    fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        os.close(fd)
        raise PermissionError(f"{path}: not a private file of this user; refusing to read it.")
    return os.fdopen(fd, "rb")


def check_output(out: str | os.PathLike[str], *, inputs: list[str | os.PathLike[str]] = (),
                 force: bool = False, suffixes: tuple[str, ...] = (), what: str = "output") -> Path:
    """Refuse an output path before any work is done: one of the inputs, a folder, the wrong kind of
    file, or (without ``force``) a file that exists.

    Args:
        out: the file a command will write.
        inputs: files the command reads (never replaced, even with ``force``).
        force: allow replacing an existing file that is not an input.
        suffixes: allowed endings (e.g. ``(".nii.gz", ".nii")``); empty: any.
        what: how the error names the path (``--out``).

    Raises:
        FileExistsError: for an input, a folder, or an existing file without ``force``.
        ValueError: for another ending than ``suffixes``.
    """
    out = Path(out)
    resolved = out.resolve()
    for path in inputs:
        if Path(path).exists() and Path(path).resolve() == resolved:
            raise FileExistsError(f"{what} {out} is one of this command's inputs; it is never overwritten.")
    if suffixes and not out.name.endswith(suffixes):
        raise ValueError(f"{what} {out}: must end in {' or '.join(suffixes)}.")
    if out.is_dir():
        raise FileExistsError(f"{what} {out} is a folder; give a file name inside it.")
    if out.exists() and not force:
        raise FileExistsError(f"{what} {out} exists; pass --force to replace it.")
    return out


def is_case_name(case: object) -> bool:
    """Whether ``case`` can name a case folder or file stem below a data folder and no path out of it: a non-empty
    string without a path separator or NUL that does not start with '.' (so neither '.' nor '..')."""
    return isinstance(case, str) and bool(case) and not case.startswith(".") and not any(c in case for c in "/\\\0")
