"""Crash-safe writes: a crash at any instant leaves the old version or the new one, never a mix.

Files (:func:`atomic_write`): the new content goes to a hidden temporary file beside the target,
is flushed to disk (``fsync``), then renamed over the target; the folder is fsynced after it.

Directories (:func:`atomic_directory`), for saves made of several files (an adapter's config and
weights, a merged export, an ``AdapterCheckpoint`` save):

1. the whole new version is written into a hidden sibling ``.NAME.tmp-<hex>``; every file and
   folder in it is fsynced;
2. if ``NAME`` does not exist yet, ``.NAME.tmp-<hex>`` is renamed to ``NAME`` (one atomic rename);
3. if it exists, the two are swapped in one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux), so
   ``NAME`` is at every instant either the complete old or the complete new directory; the old
   one, now under the temporary name, is deleted. Where the exchange is unavailable (another OS,
   a filesystem without it), the old directory is renamed aside to ``.NAME.old-<hex>`` first, then
   the new one renamed in: between those two renames ``NAME`` is missing, and
   :func:`recover_directory` (called by every loader) renames the old one back;
4. the parent folder is fsynced after each rename.

Deleting a save (:func:`remove_directory`, used for pruning) renames it to ``.NAME.trash-<hex>``
first, then deletes that, so a half-deleted save never sits under a name that looks like a save.
Hidden leftovers of an interrupted save or delete are removed by the next save of the same name
(:func:`clean_leftovers`; ``AdapterCheckpoint`` cleans its whole folder, :func:`clean_folder`), and
loaders refuse them by name (:func:`refuse_leftover`).

Full or read-only disks (``ENOSPC``, ``EDQUOT``, ``EROFS``, and the ways torch and safetensors
report them) surface as one :class:`StorageFullError` naming the path; the previous version stays.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fnmatch
import os
import re
import shutil
import stat
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Collection, Iterator

# hidden siblings this module creates: .NAME.tmp-HEX (being written), .NAME.old-HEX (old version
# renamed aside, fallback swap only), .NAME.trash-HEX (being deleted)
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|trash)-[0-9a-f]{32}$")

_STORAGE_ERRNOS = {errno.ENOSPC: "the disk is full (no space left on device)",
                   errno.EDQUOT: "the disk quota is exceeded",
                   errno.EROFS: "the file system is read-only"}
# how torch.save and safetensors report a failed write (they do not keep the errno)
_STORAGE_TEXT = (("unexpected pos", errno.ENOSPC), ("file write failed", errno.ENOSPC),
                 ("No space left on device", errno.ENOSPC), ("StorageFull", errno.ENOSPC),
                 ("code: 28,", errno.ENOSPC), ("Disk quota exceeded", errno.EDQUOT), ("code: 122,", errno.EDQUOT),
                 ("Read-only file system", errno.EROFS), ("ReadOnlyFilesystem", errno.EROFS),
                 ("code: 30,", errno.EROFS))


class StorageFullError(OSError):
    """A save failed because the disk is full, over quota or read-only; the previous save is intact."""


def storage_error(err: BaseException, path: Path) -> StorageFullError | None:
    """The :class:`StorageFullError` that ``err`` (raised while writing ``path``) amounts to, or None."""
    code = getattr(err, "errno", None) if isinstance(err, OSError) else None
    if code not in _STORAGE_ERRNOS:
        text = str(err)
        code = next((c for needle, c in _STORAGE_TEXT if needle in text), None)
        if code is None:
            return None
    what = _STORAGE_ERRNOS[code]
    fix = ("free some space (or write elsewhere) and save again" if code != errno.EROFS
           else "write to a writable location")
    return StorageFullError(code, f"cannot save {path}: {what}; {fix}. The previous version of {path}, if any, "
                                  f"is unchanged. ({type(err).__name__}: {err})")


def _raise_storage(err: BaseException, path: Path) -> None:
    mapped = storage_error(err, path)
    if mapped is not None:
        raise mapped from err


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, flush it to disk, then rename it
    over ``path`` (same folder, so the rename is atomic) and flush the folder.

    The file gets the permissions a plain ``open(path, "w")`` would give it (those of the file it
    replaces, else ``0o666`` less the umask): some writers (safetensors) create files ``0o600``.
    A full or read-only disk raises :class:`StorageFullError`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as err:
        _raise_storage(err, path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)  # reading the umask means setting it; put it straight back
        os.umask(umask)
        return 0o666 & ~umask


# ------------------------------------------------------------------------------ directories
def _hidden(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{uuid.uuid4().hex}")


def leftovers(path: Path, kinds: Collection[str] = ("tmp", "old", "trash")) -> list[Path]:
    """Hidden siblings of ``path`` left by an interrupted save or delete of that name."""
    path = Path(path)
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == path.name and match["kind"] in kinds:
            found.append(path.parent / entry.name)
    return sorted(found)


def _rmtree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def recover_directory(path: str | os.PathLike) -> bool:
    """Undo a save interrupted between the two renames of the fallback swap: if ``path`` is
    missing and its old version sits aside (``.NAME.old-<hex>``), rename it back. Returns whether
    it did. Loaders call this before reading; it changes nothing in any other state."""
    path = Path(path)
    if os.path.lexists(path):
        return False
    old = leftovers(path, kinds=("old",))
    if not old:
        return False
    newest = max(old, key=lambda p: p.stat().st_mtime_ns)
    try:
        os.rename(newest, path)
    except OSError:
        return False
    _fsync_dir(path.parent)
    return True


def refuse_leftover(path: str | os.PathLike) -> None:
    """Raise if ``path`` is a hidden leftover of an interrupted save or delete (never a save)."""
    path = Path(path)
    match = _LEFTOVER.match(path.name)
    if match:
        what = {"tmp": "a save that was still being written", "old": "the previous version of a save being replaced",
                "trash": "a save that was being deleted"}[match["kind"]]
        raise ValueError(f"{path} is {what} when the process stopped (an incomplete or superseded directory, not a "
                         f"save). Load {path.with_name(match['name'])} instead; the next save of that name removes "
                         f"this leftover.")


def clean_leftovers(path: Path) -> None:
    """Remove what interrupted saves and deletes of ``path`` left behind (restoring the old version
    first if ``path`` itself is missing)."""
    recover_directory(path)
    for leftover in leftovers(path):
        _rmtree(leftover)


def clean_folder(folder: str | os.PathLike) -> None:
    """:func:`clean_leftovers` for every name in ``folder`` that has leftovers (a folder of saves,
    such as ``AdapterCheckpoint``'s, where a pruned or renamed save is not written again)."""
    try:
        names = {m["name"] for m in map(_LEFTOVER.match, os.listdir(folder)) if m}
    except FileNotFoundError:
        return
    for name in names:
        clean_leftovers(Path(folder) / name)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            file = os.path.join(folder, name)
            if os.path.islink(file):
                continue
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    OS or filesystem cannot (the caller then falls back to two renames)."""
    if _RENAMEAT2 is None:
        return False
    result = _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, f"cannot swap {a} and {b}: {os.strerror(code)}")


def _carry_over(old: Path, new: Path, owned: Collection[str]) -> None:
    """Hard-link (else copy) into ``new`` the entries of ``old`` that the save does not own and did
    not write: files a user keeps beside a save (a README, other adapters' sub-folders) survive it."""
    for entry in os.scandir(old):
        if any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in owned):
            continue
        target = new / entry.name
        if os.path.lexists(target) or _LEFTOVER.match(entry.name):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        else:
            _link_or_copy(entry.path, target)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _contains_cwd(path: Path) -> bool:
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    return cwd == path or path in cwd.parents


@contextmanager
def atomic_directory(path: str | os.PathLike, owned: Collection[str] = ("*",)) -> Iterator[Path]:
    """Build a new version of directory ``path`` in the yielded temporary folder; on a clean exit
    it replaces ``path`` whole (see the module docstring for the renames and fsyncs); on an
    exception nothing changes and the temporary folder is removed.

    ``owned``: name patterns of the entries this save writes. Entries of an existing ``path`` that
    match none of them (say a README beside an adapter) are carried over into the new version;
    the default ``("*",)`` replaces everything. A full or read-only disk raises
    :class:`StorageFullError`.

    A ``path`` that cannot be swapped (the working directory or one holding it, a mount point)
    is written into in place, file by file, each file atomically (the old behaviour)."""
    path = Path(os.path.abspath(path))
    if path.is_symlink():  # replace what the link points at, keep the link
        path = Path(os.path.realpath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(path)
        in_place = path.is_dir() and (_contains_cwd(path.resolve()) or os.path.ismount(path))
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"cannot save the directory {path}: a file of that name exists. Remove it or choose "
                                  f"another path.")
    except OSError as err:
        _raise_storage(err, path)
        raise
    if in_place:
        yield from _write_in_place(path)
        return
    tmp = _hidden(path, "tmp")
    try:
        tmp.mkdir()
        if path.is_dir():
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        yield tmp
        if path.is_dir():
            _carry_over(path, tmp, owned)
        _fsync_tree(tmp)
        if not path.exists():
            os.rename(tmp, path)
        elif exchange(tmp, path):
            pass  # tmp now holds the old version
        else:
            old = _hidden(path, "old")
            os.rename(path, old)  # from here to the next rename, path is missing: recover_directory covers it
            os.rename(tmp, path)
            tmp = old
        _fsync_dir(path.parent)
    except BaseException as err:
        if isinstance(err, Exception):
            _raise_storage(err, path)
        raise
    finally:
        _rmtree(tmp)


def _write_in_place(path: Path) -> Iterator[Path]:
    tmp = _hidden(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        for folder, _, files in os.walk(tmp):
            rel = Path(folder).relative_to(tmp)
            (path / rel).mkdir(parents=True, exist_ok=True)
            for name in files:
                os.replace(Path(folder) / name, path / rel / name)
            _fsync_dir(path / rel)
    except Exception as err:
        _raise_storage(err, path)
        raise
    finally:
        _rmtree(tmp)


def remove_directory(path: str | os.PathLike) -> None:
    """Delete a save so that no half-deleted directory is ever visible under its name: rename it
    to ``.NAME.trash-<hex>`` (atomic), flush the folder, then delete that."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    trash = _hidden(path, "trash")
    os.rename(path, trash)
    _fsync_dir(path.parent)
    _rmtree(trash)
