"""Uploads staged only while they are checked or screened: a private folder (mode 0700) in
memory (``/dev/shm``) when there is room and no cluster is configured, else under the data
folder; deleted on leaving the block whatever happens."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fmmtc_app.session import setting

if TYPE_CHECKING:
    from streamlit.runtime.uploaded_file_manager import UploadedFile

__all__ = ["upload_root", "memory_root", "staged_uploads", "STALE_UPLOAD_S", "MEMORY_FS"]

#: Staging folders older than this (seconds) are left over from a killed server and removed.
STALE_UPLOAD_S = 3600


def _share_uploads() -> None:
    """Let Streamlit hand the pages their uploaded files without deep-copying them.

    Streamlit deep-copies every widget's value on every script run, so that page code cannot
    change a widget's state by mutating what it got. An ``UploadedFile`` is a ``BytesIO`` over
    the whole upload, so every run of a page with a scan attached copied it twice (through
    pickling's state): 0.25 s of the server's CPU for a 155 MB scan in the run that hands it to
    the worker, on the 2 cores the worker screens on (py-spy of the server during
    ``bench/bench_dashboard.py``). The pages only read uploads (``io.write_upload`` starts
    from the beginning), so sharing the one object is safe.
    """
    from streamlit.runtime.uploaded_file_manager import UploadedFile

    if "__deepcopy__" not in UploadedFile.__dict__:
        UploadedFile.__deepcopy__ = lambda self, memo: self  # type: ignore[method-assign]


_share_uploads()


#: The RAM file system uploads are staged on when it has room (Linux; absent elsewhere).
MEMORY_FS = Path("/dev/shm")

#: Room left on :data:`MEMORY_FS` beside a staged upload (bytes): other programs use it too.
MEMORY_MARGIN = 256 << 20


def _remove_stale(root: Path) -> None:
    now = time.time()
    for old in root.glob("upload-*"):
        try:
            if now - old.stat().st_mtime > STALE_UPLOAD_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def memory_root(size: int) -> Path | None:
    """A private folder in memory for uploads of ``size`` bytes, or None to use the disk.

    Why: written to the data folder, a 155 MB scan took 0.05-0.7 s (the disk's write-back
    throttling; bench/bench_dashboard.py), in memory a steady 0.07 s - and the raw image never
    reaches a disk. Not used when ``FMMTC_CLUSTER`` is set (workers on other hosts read the
    staged files from the shared data folder), when :data:`MEMORY_FS` is missing, has less
    than twice ``size`` plus :data:`MEMORY_MARGIN` free (Docker gives containers 64 MB), or
    holds a folder of ours that is not a directory we own.

    Parameters
    ----------
    size : int
        Bytes to stage.

    Returns
    -------
    Path or None
        ``<MEMORY_FS>/fmmtc-<uid>/uploads`` (mode 0700), stale ``upload-*`` folders removed.
    """
    if setting("FMMTC_CLUSTER"):
        return None
    try:
        if not MEMORY_FS.is_dir() or (
                shutil.disk_usage(MEMORY_FS).free < 2 * size + MEMORY_MARGIN):
            return None
        mine = MEMORY_FS / f"fmmtc-{os.getuid()}"
        if not mine.exists():
            mine.mkdir(mode=0o700)
        if mine.is_symlink() or not mine.is_dir() or mine.stat().st_uid != os.getuid():
            return None  # someone else's: never write there
        mine.chmod(0o700)
        root = mine / "uploads"
        root.mkdir(mode=0o700, exist_ok=True)
        root.chmod(0o700)
    except OSError:
        return None
    _remove_stale(root)
    return root


def upload_root() -> Path:
    """Where uploads are staged while they are checked: ``<data folder>/uploads``.

    The folder is created if needed and made readable by the server's user only (mode 0700).
    Leftover ``upload-*`` folders of a killed server, older than :data:`STALE_UPLOAD_S`, are
    removed here.

    Returns
    -------
    Path
        ``<FMMTC_DATA_DIR setting, else fmmtc_core.store.data_dir()>/uploads``.
    """
    from fmmtc_core.store import data_dir

    root = Path(setting("FMMTC_DATA_DIR") or data_dir()) / "uploads"
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    _remove_stale(root)
    return root


@contextmanager
def staging_folder(prefix: str = "upload-", size: int | None = None) -> Iterator[Path]:
    """A fresh private folder, removed on leaving the block: in memory
    (:func:`memory_root`) for ``size`` bytes when given and there is room, else under
    :func:`upload_root`.

    Parameters
    ----------
    prefix : str, default="upload-"
        Start of the folder's name. Only ``upload-*`` folders are cleaned up by
        :func:`upload_root` if the server is killed inside the block.
    size : int or None, default=None
        Bytes that will be written; None: on disk.

    Yields
    ------
    Path
        The folder (mode 0700); it and its contents are deleted on leaving the block,
        whatever happens.
    """
    root = (memory_root(size) if size is not None else None) or upload_root()
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def staged_uploads(*files: UploadedFile | None) -> Iterator[list[Path | None]]:
    """Write uploaded files into a private folder and delete it on leaving the block.

    The folder is made by :func:`staging_folder` (mode 0700; in memory when there is room,
    else under :func:`upload_root`) and deleted whatever happens: the raw scan exists only
    while it is being checked or screened.

    Parameters
    ----------
    *files : streamlit UploadedFile or None
        The uploads (anything with a ``name`` and binary content, see
        :func:`fmmtc_core.io.write_upload`); None for a file not given.

    Yields
    ------
    list of Path or None
        The written files under sanitised names, in the order given (None for None).
    """
    from fmmtc_core.io import write_upload

    size = sum(int(getattr(f, "size", 0) or 0) for f in files if f is not None)
    with staging_folder(size=size) as folder:
        yield [None if f is None else write_upload(f, f.name, folder) for f in files]
