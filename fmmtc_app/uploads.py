"""Uploads staged on disk only while they are checked or screened: a private folder (mode
0700) under the data folder, deleted on leaving the block whatever happens."""

from __future__ import annotations

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

__all__ = ["upload_root", "staged_uploads", "STALE_UPLOAD_S"]

#: Staging folders older than this (seconds) are left over from a killed server and removed.
STALE_UPLOAD_S = 3600


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
    now = time.time()
    for old in root.glob("upload-*"):
        try:
            if now - old.stat().st_mtime > STALE_UPLOAD_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return root


@contextmanager
def staging_folder(prefix: str = "upload-") -> Iterator[Path]:
    """A fresh private folder under :func:`upload_root`, removed on leaving the block.

    Parameters
    ----------
    prefix : str, default="upload-"
        Start of the folder's name. Only ``upload-*`` folders are cleaned up by
        :func:`upload_root` if the server is killed inside the block.

    Yields
    ------
    Path
        The folder (mode 0700); it and its contents are deleted on leaving the block,
        whatever happens.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=upload_root()))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def staged_uploads(*files: UploadedFile | None) -> Iterator[list[Path | None]]:
    """Write uploaded files into a private folder and delete it on leaving the block.

    The folder is made by :func:`staging_folder` (mode 0700, under :func:`upload_root`) and
    deleted whatever happens: the raw scan is on disk only while it is being checked or
    screened.

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

    with staging_folder() as folder:
        yield [None if f is None else write_upload(f, f.name, folder) for f in files]
