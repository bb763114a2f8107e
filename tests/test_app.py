"""Dashboard pages driven with Streamlit's AppTest (no browser)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_bold, save_nifti
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


def _app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception
    return at


def _submit(at: AppTest) -> AppTest:
    at.form_submit_button[0].click()
    return at.run()


def test_qc_page_renders_without_upload():
    at = _app()
    assert at.title[0].value == "Scan quality"
    assert len(at.file_uploader) == 3
    assert not at.error


def test_upload_valid_scan_shows_verdict_and_metrics(tmp_path, grid_labels):
    path = save_nifti(tmp_path / "sub-01_bold.nii.gz", make_bold(grid_labels))
    at = _app()
    at.selectbox[0].set_value("aal3")
    at.file_uploader[0].upload("sub-01_bold.nii.gz", path.read_bytes(), "application/gzip")
    _submit(at)
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    verdicts = [w.value for w in at.warning] + [s.value for s in at.success]
    assert any("quality control" in v or "warnings" in v for v in verdicts)
    labels = {m.label: m.value for m in at.metric}
    assert labels["Volumes"] == "60" and labels["TR (s)"] == "2"


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.nii.gz", b"", "is empty"),
        ("fake.nii", b"\x00" * 600, "wrong magic number"),
        ("broken.nii.gz", b"\x1f\x8b\x08\x00" + b"\xff" * 64, "corrupt gzip"),
    ],
)
def test_bad_upload_shows_a_plain_error(name, content, match):
    at = _app()
    at.file_uploader[0].upload(name, content, "application/octet-stream")
    _submit(at)
    assert not at.exception
    assert len(at.error) == 1
    assert at.error[0].value.startswith("This scan cannot be used: ")
    assert match in at.error[0].value
    assert "Traceback" not in at.error[0].value


def test_submit_without_file_asks_for_one():
    at = _app()
    _submit(at)
    assert at.error[0].value == "Choose a scan file to upload first."


def test_demo_scan_is_labelled_as_simulated():
    at = _app()
    at.button(key="demo").click()
    at.run(timeout=180)
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    assert any("Simulated data" in i.value for i in at.info)
    labels = {m.label: m.value for m in at.metric}
    assert labels["Volumes"] == "300"
