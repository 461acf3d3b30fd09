"""Files mpmsub writes: private to its user.

What mpmsub creates (the history, a trace, a joblog, a SLURM run's files) is made with mode 0600
in directories of mode 0700, since it holds commands and their environment (a token on a command
line). What it reads back and trusts (a SLURM job's spec and result) must be a regular file of
this user that no one else can write, in a directory no one else can enter: a file another local
user could have placed or changed is refused, never unpickled.
"""

from __future__ import annotations

import os
import stat
from typing import Optional

from mpmsub._errors import MpmsubError

FILE_MODE = 0o600
DIRECTORY_MODE = 0o700
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # Linux and macOS have it; elsewhere a symlink is followed
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class UnsafeFileError(MpmsubError):
    """A file or directory mpmsub was to trust is not private to this user (its owner, mode or
    type is wrong); the message names it and says why."""


def open_private(path: str, flags: int = 0, *, follow_symlinks: bool = True) -> int:
    """A descriptor open for writing on `path` (plus `flags`: os.O_EXCL, os.O_TRUNC,
    os.O_APPEND), which is created with mode 0600 if absent. An existing file keeps its mode: it
    is the user's. With os.O_EXCL (or `follow_symlinks` False) a symlink at `path` is refused."""
    flags |= os.O_WRONLY | os.O_CREAT | _CLOEXEC
    if not follow_symlinks:
        flags |= _NOFOLLOW
    return os.open(path, flags, FILE_MODE)


def make_private_directory(parent: str, prefix: str) -> str:
    """A new directory in `parent` (made, 0700, if absent; an existing one is accepted), with an
    unpredictable name (`tempfile.mkdtemp`: created exclusively, mode 0700), checked to be ours."""
    os.makedirs(parent, mode=DIRECTORY_MODE, exist_ok=True)
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        _check_open_directory(path, made=False)
    except UnsafeFileError:
        os.rmdir(path)
        raise
    return path


def private_directory(path: str, create: bool) -> bool:
    """Whether `path` is there, as a directory private to this user; with `create`, made (mode
    0700, exclusively; its parents too) if absent. Raises UnsafeFileError for one that is a
    symlink, another user's, or open to others."""
    made = False
    if create:
        os.makedirs(os.path.dirname(path), mode=DIRECTORY_MODE, exist_ok=True)
        try:
            os.mkdir(path, DIRECTORY_MODE)
            made = True
        except FileExistsError:
            pass
    try:
        _check_open_directory(path, made)
    except FileNotFoundError:
        return False
    return True


def _check_open_directory(path: str, made: bool) -> None:
    """Open `path` without following a symlink and check it is a private directory of ours;
    one this call `made` first gets the mode 0700 that the umask may have narrowed."""
    fd = _open_nofollow(path, os.O_RDONLY | _DIRECTORY)
    try:
        status = os.fstat(fd)
        if made and status.st_uid == os.geteuid():
            os.fchmod(fd, DIRECTORY_MODE)
            status = os.fstat(fd)
        _check_directory(path, status)
    finally:
        os.close(fd)


def read_private(path: str) -> bytes:
    """The contents of `path`, a regular file of this user (not a symlink) that no one else can
    write, in a directory of this user that no one else can enter. Raises UnsafeFileError saying
    which is not so, FileNotFoundError if it is absent."""
    directory = os.path.dirname(path) or "."
    dir_fd = _open_nofollow(directory, os.O_RDONLY | _DIRECTORY)
    try:
        _check_directory(directory, os.fstat(dir_fd))
        # Opened in the directory just checked (dir_fd): no rename of a path can swap what is read.
        # O_NONBLOCK: a FIFO put in its place must not hang the open (it is refused below).
        fd = _open_nofollow(os.path.basename(path), os.O_RDONLY | os.O_NONBLOCK, dir_fd, repr(path))
    finally:
        os.close(dir_fd)
    with os.fdopen(fd, "rb") as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise UnsafeFileError(f"{path!r} is not a regular file")
        _check_owner(path, status)
        if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeFileError(f"{path!r} can be written by other users (mode {_mode(status)})")
        return file.read()


def _open_nofollow(path: str, flags: int, dir_fd: Optional[int] = None, shown: str = "") -> int:
    try:
        return os.open(path, flags | _NOFOLLOW | _CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        # O_NOFOLLOW refuses a symlink with ELOOP (EMLINK on the BSDs): say so, not "too many links".
        if isinstance(exc, FileNotFoundError):
            raise
        try:
            link = stat.S_ISLNK(os.stat(path, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            link = False
        if not link:
            raise
        raise UnsafeFileError(f"{shown or repr(path)} is a symbolic link") from None


def _check_directory(path: str, status: os.stat_result) -> None:
    if not stat.S_ISDIR(status.st_mode):
        raise UnsafeFileError(f"{path!r} is not a directory")
    _check_owner(path, status)
    if stat.S_IMODE(status.st_mode) & 0o077:
        raise UnsafeFileError(f"the directory {path!r} is open to other users (mode {_mode(status)}; expected 0700)")


def _check_owner(path: str, status: os.stat_result) -> None:
    if status.st_uid != os.geteuid():
        raise UnsafeFileError(f"{path!r} belongs to user id {status.st_uid}, not to this user ({os.geteuid()})")


def _mode(status: os.stat_result) -> str:
    return f"{stat.S_IMODE(status.st_mode):04o}"
