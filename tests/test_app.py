"""Dashboard pages driven with Streamlit's AppTest (no browser): every page, uploads, errors,
the cohort page's filters / outcomes / export, the explorer, the model page, the access gate."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_bold, save_nifti
from streamlit.testing.v1 import AppTest

from fmmtc_core.store import open_database, row_counts

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


@pytest.fixture
def db(tmp_path, monkeypatch):
    """A fresh cohort database for each test (the app's default location, moved)."""
    monkeypatch.setenv("FMMTC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FMMTC_DEMO_COHORT_SIZE", "4")
    return f"sqlite:///{tmp_path / 'data' / 'fmmtc.db'}"


def _app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    if page:
        at.switch_page(f"pages/{page}.py")
        at.run()
    assert not at.exception, at.exception
    return at


def _errors(at):
    return [e.value for e in at.error]


def _counts(db):
    return row_counts(open_database(db))


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page, title", [(None, "Screen a participant"),
                                         ("explore", "Attribution explorer"),
                                         ("cohort", "Cohort review"), ("model", "Model"),
                                         ("qc", "Scan quality")])
def test_every_page_renders_on_an_empty_database(db, page, title):
    at = _app(page)
    assert at.title[0].value == title
    assert not at.error


def test_screen_a_nifti_upload_shows_the_result_and_stores_it(db, hcpex_scans):
    nifti = hcpex_scans[1]
    at = _app()
    at.text_input(key="pseudonym").input("PAIN-0042")
    at.file_uploader[0].upload(nifti.name, nifti.read_bytes(), "application/gzip")
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception and not _errors(at), _errors(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Responder probability"].endswith("%")
    assert metrics["Decision"] in ("likely responder", "likely non-responder", "uncertain")
    assert "Completeness gap" in metrics and "Connectivity share" in metrics
    assert any("Saved to the cohort as screening 1" in s.value for s in at.success)
    assert at.subheader[0].value == "Participant PAIN-0042"
    counts = _counts(db)
    assert counts["screenings"] == 1 and counts["region_attributions"] == 426


def test_screen_a_table_with_its_sidecar(db, hcpex_scans):
    table = hcpex_scans[0]
    at = _app()
    at.text_input(key="pseudonym").input("PAIN-0043")
    at.file_uploader[0].upload(table.name, table.read_bytes(), "text/tab-separated-values")
    at.file_uploader[1].upload("side.json", table.with_suffix(".json").read_bytes(),
                               "application/json")
    at.form_submit_button[0].click()
    at.run()
    assert not _errors(at), _errors(at)
    assert _counts(db)["screenings"] == 1


@pytest.mark.parametrize("name, content, match", [
    ("empty.nii.gz", b"", "is empty"),
    ("fake.nii", b"\x00" * 600, "wrong magic number"),
    ("broken.nii.gz", b"\x1f\x8b\x08\x00" + b"\xff" * 64, "corrupt gzip"),
])
def test_bad_upload_shows_a_plain_error_and_stores_nothing(db, name, content, match):
    at = _app()
    at.text_input(key="pseudonym").input("PAIN-0001")
    at.file_uploader[0].upload(name, content, "application/octet-stream")
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception
    assert len(at.error) == 1
    assert at.error[0].value.startswith("This scan cannot be used: ")
    assert match in at.error[0].value and "Traceback" not in at.error[0].value
    assert all(v == 0 for v in _counts(db).values())


def test_screen_asks_for_pseudonym_and_file(db, hcpex_scans):
    at = _app()
    at.form_submit_button[0].click()
    at.run()
    assert _errors(at) == ["Enter the participant's study pseudonym first (e.g. PAIN-0042)."]
    at.text_input(key="pseudonym").input("PAIN-1")
    at.form_submit_button[0].click()
    at.run()
    assert _errors(at) == ["Choose a scan file to upload first."]
    at.text_input(key="pseudonym").input("Jane Doe")
    nifti = hcpex_scans[1]
    at.file_uploader[0].upload(nifti.name, nifti.read_bytes(), "application/gzip")
    at.form_submit_button[0].click()
    at.run()
    assert "not a valid study pseudonym" in _errors(at)[0]
    assert all(v == 0 for v in _counts(db).values())


def test_qc_failure_is_explained_and_not_stored(db, tmp_path, grid_labels):
    from conftest import fmriprep_confounds

    bold = save_nifti(tmp_path / "sub-q_bold.nii.gz", make_bold(grid_labels, 60))
    conf = tmp_path / "conf.tsv"
    fmriprep_confounds(60, fd_scale=3.0).to_csv(conf, sep="\t", index=False, na_rep="n/a")
    at = _app()
    at.text_input(key="pseudonym").input("PAIN-9")
    at.file_uploader[0].upload(bold.name, bold.read_bytes(), "application/gzip")
    at.file_uploader[2].upload("conf.tsv", conf.read_bytes(), "text/tab-separated-values")
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception
    assert _errors(at)[0].startswith("Not screened: The scan failed quality control")
    assert all(v == 0 for v in _counts(db).values())


def test_demo_participant_is_labelled_as_simulated(db):
    at = _app()
    at.button(key="demo").click()
    at.run()
    assert not at.exception and not _errors(at), _errors(at)
    assert any("SIMULATED participant" in i.value for i in at.info)
    assert at.subheader[0].value == "Participant SIM-DEMO"


def test_cohort_page_demo_cohort_filters_outcomes_and_export(db):
    at = _app("cohort")
    at.button(key="load_demo").click()
    at.run()
    assert not at.exception and not _errors(at), _errors(at)
    assert any("Loaded 4 simulated participants" in s.value for s in at.success)
    assert any("SIMULATED demo data" in w.value for w in at.warning)
    assert len(at.dataframe[0].value) == 4
    counts = _counts(db)
    assert counts["screenings"] == 4 and counts["outcomes"] == 4
    assert {m.label for m in at.metric} >= {"Enrolled", "Number needed to screen",
                                            "Base rate (all screened)"}
    assert len(at.get("plotly_chart")) >= 3  # histogram, ROC, calibration
    assert at.get("download_button")  # CSV export of the shown rows
    # filters: keep only one site
    sites = at.multiselect(key="f_site").options
    at.multiselect(key="f_site").set_value([sites[0]])
    at.run()
    shown = at.dataframe[0].value
    assert 0 < len(shown) < 4 and set(shown["site"]) == {sites[0]}
    # the threshold changes the enrolled count
    at.slider(key="threshold").set_value(0.0)
    at.run()
    enrolled = {m.label: m.value for m in at.metric}["Enrolled"]
    assert enrolled == f"{len(shown)} of {len(shown)}"
    # enter an observed outcome
    at.selectbox(key="o_who").set_value(at.selectbox(key="o_who").options[0])
    at.radio(key="o_what").set_value("non-responder")
    at.form_submit_button[0].click()
    at.run()
    assert not _errors(at)
    assert any(s.value.startswith("Recorded: ") for s in at.success)
    assert _counts(db)["outcomes"] == 5


def test_explorer_shows_and_compares_stored_screenings(db):
    at = _app("cohort")
    at.button(key="load_demo").click()
    at.run()
    at.switch_page("pages/explore.py")
    at.run()
    assert not at.exception and not _errors(at), _errors(at)
    labels = {m.label for m in at.metric}
    assert {"Probability", "Decision", "IG gap"} <= labels
    views = at.radio(key="a-view").options
    assert len(views) == 6
    for view in views[1:]:  # every view draws without an error
        at.radio(key="a-view").set_value(view)
        at.run()
        assert not at.exception and not _errors(at), (view, _errors(at))
    at.toggle(key="explore_compare").set_value(True)
    at.run()
    assert not at.exception
    assert len([m for m in at.metric if m.label == "Probability"]) == 2


def test_model_page_shows_the_card(db):
    at = _app("model")
    labels = {m.label: m.value for m in at.metric}
    assert labels["AUC"] == "0.890"
    assert any("SIMULATED" in w.value for w in at.warning)
    assert any("| model |" in md.value for md in at.markdown)  # the ablation table


def test_password_gate_and_operator_in_audit_log(db, monkeypatch):
    from sqlalchemy import text

    monkeypatch.setenv("FMMTC_PASSWORD", "s3cret")
    at = _app()
    assert at.title[0].value == "FMM-TC Screen"
    assert len(at.text_input) == 2 and not at.file_uploader
    at.text_input[0].input("dr who")
    at.text_input[1].input("wrong")
    at.form_submit_button[0].click()
    at.run()
    assert _errors(at) == ["That password is not correct. Ask your study coordinator for it."]
    at.text_input[1].input("s3cret")
    at.form_submit_button[0].click()
    at.run()
    assert at.title[0].value == "Screen a participant"
    at.button(key="demo").click()
    at.run()
    assert not _errors(at)
    with open_database(db).connect() as conn:
        actors = {r[0] for r in conn.execute(text("SELECT actor FROM audit_log"))}
    assert actors == {"dr who"}


# --------------------------------------------------------------------------------------------
# The scan quality page (no database)
# --------------------------------------------------------------------------------------------
def test_qc_page_upload_valid_scan_shows_verdict_and_metrics(db, tmp_path, grid_labels):
    path = save_nifti(tmp_path / "sub-01_bold.nii.gz", make_bold(grid_labels))
    at = _app("qc")
    at.selectbox[0].set_value("aal3")
    at.file_uploader[0].upload("sub-01_bold.nii.gz", path.read_bytes(), "application/gzip")
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception
    assert not at.error, [e.value for e in at.error]
    verdicts = [w.value for w in at.warning] + [s.value for s in at.success]
    assert any("quality control" in v or "warnings" in v for v in verdicts)
    labels = {m.label: m.value for m in at.metric}
    assert labels["Volumes"] == "60" and labels["TR (s)"] == "2"


def test_qc_page_bad_upload_shows_a_plain_error(db):
    at = _app("qc")
    at.file_uploader[0].upload("fake.nii", b"\x00" * 600, "application/octet-stream")
    at.form_submit_button[0].click()
    at.run()
    assert at.error[0].value.startswith("This scan cannot be used: ")
    assert "wrong magic number" in at.error[0].value
