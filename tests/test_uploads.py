"""Uploads staged for the worker (fmmtc_app.uploads): private folder, deleted afterwards, the
upload written as it came, never copied by Streamlit's per-run deep copy."""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path

import pytest

pytest.importorskip("streamlit")

from streamlit.proto.Common_pb2 import FileURLs  # noqa: E402
from streamlit.runtime.uploaded_file_manager import (  # noqa: E402
    UploadedFile,
    UploadedFileRec,
)

from fmmtc_app import uploads  # noqa: E402


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FMMTC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("FMMTC_CLUSTER", raising=False)
    return tmp_path / "data"


@pytest.fixture
def shm(tmp_path, monkeypatch):
    """A stand-in for /dev/shm."""
    (tmp_path / "shm").mkdir()
    monkeypatch.setattr(uploads, "MEMORY_FS", tmp_path / "shm")
    return tmp_path / "shm"


def _upload(name: str, data: bytes) -> UploadedFile:
    return UploadedFile(UploadedFileRec(file_id="f1", name=name, type="application/gzip",
                                        data=data), FileURLs())


def test_an_upload_is_shared_not_deep_copied():
    # Streamlit deep-copies every widget value on every run: for a scan that was two copies
    # of the whole file in the server, on the cores the worker screens on.
    f = _upload("scan.nii.gz", b"x" * 1000)
    assert copy.deepcopy(f) is f
    assert copy.deepcopy({"value": f})["value"] is f


def test_staged_uploads_are_private_in_memory_written_whole_and_removed(data_dir, shm):
    payload = bytes(range(256)) * 4096
    f = _upload("../../etc/sub-01 bold.nii.gz", payload)
    f.read(100)  # a page may have read part of it already
    with uploads.staged_uploads(f, None) as (scan, missing):
        assert missing is None
        assert scan.name == "sub-01_bold.nii.gz" and scan.read_bytes() == payload
        folder = scan.parent
        assert folder.parent == shm / f"fmmtc-{os.getuid()}" / "uploads"
        for d in (folder, folder.parent, folder.parent.parent):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert not folder.exists()
    assert not (data_dir / "uploads").exists()  # the raw scan never touched the disk


def test_staging_an_upload_makes_no_copy_of_it_in_memory(data_dir, shm):
    # The server used to copy the whole upload once more before writing it (0.1 s for a
    # 155 MB scan, on the cores the worker screens on).
    import tracemalloc

    payload = bytes(range(256)) * 40_000  # 10 MB
    f = _upload("scan.nii.gz", payload)
    tracemalloc.start()
    try:
        with uploads.staged_uploads(f) as (scan,):
            _, peak = tracemalloc.get_traced_memory()
            assert scan.stat().st_size == len(payload)
    finally:
        tracemalloc.stop()
    assert peak < len(payload) // 10


def _staged_in(files) -> Path:
    with uploads.staged_uploads(*files) as paths:
        return paths[0].parent.parent


def test_uploads_go_to_the_data_folder_when_memory_cannot_take_them(data_dir, shm,
                                                                    monkeypatch):
    f = _upload("scan.nii.gz", b"x" * 1000)
    assert _staged_in([f]) == shm / f"fmmtc-{os.getuid()}" / "uploads"
    monkeypatch.setattr(uploads, "MEMORY_MARGIN", 1 << 60)  # not enough room
    assert _staged_in([f]) == data_dir / "uploads"
    monkeypatch.setattr(uploads, "MEMORY_MARGIN", 0)
    monkeypatch.setenv("FMMTC_CLUSTER", "tcp://10.0.0.1:8786")  # workers on other hosts
    assert _staged_in([f]) == data_dir / "uploads"
    monkeypatch.delenv("FMMTC_CLUSTER")
    monkeypatch.setattr(uploads, "MEMORY_FS", shm / "missing")
    assert _staged_in([f]) == data_dir / "uploads"


def test_a_memory_folder_that_is_not_ours_is_never_used(data_dir, shm, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (shm / f"fmmtc-{os.getuid()}").symlink_to(elsewhere)  # planted by another user
    f = _upload("scan.nii.gz", b"x" * 1000)
    assert _staged_in([f]) == data_dir / "uploads"
    assert not any(elsewhere.iterdir())
