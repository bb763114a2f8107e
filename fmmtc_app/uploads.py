"""Uploads staged on disk only while they are checked or screened: a private folder (mode
0700) under the data folder, deleted on leaving the block whatever happens."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fmmtc_app.session import setting

__all__ = ["upload_root", "staged_uploads", "STALE_UPLOAD_S"]

#: Staging folders older than this (seconds) are left over from a killed server and removed.
STALE_UPLOAD_S = 3600


def upload_root() -> Path:
    """Where uploads are staged while they are checked: ``<data folder>/uploads``, readable by
    the server's user only. Leftovers of a killed server are removed here."""
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
    """A fresh private folder under :func:`upload_root`, removed on leaving the block."""
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=upload_root()))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def staged_uploads(*files) -> Iterator[list[Path | None]]:
    """Write uploaded files (Streamlit ``UploadedFile`` or None) into a private folder (mode
    0700, see :func:`upload_root`) and delete it on leaving the block, whatever happens: the raw
    scan is on disk only while it is being checked or screened."""
    from fmmtc_core.io import write_upload

    with staging_folder() as folder:
        yield [None if f is None else write_upload(f, f.name, folder) for f in files]
