"""Dashboard pages driven with Streamlit's AppTest (no browser): every page, uploads, errors,
the cohort page's filters / outcomes / export, the explorer, the model page, the access gate."""

from __future__ import annotations

import json
import os

from pathlib import Path

import pytest
from conftest import classic_folder, fake_screening, make_bold, save_nifti
from streamlit.testing.v1 import AppTest

from fmmtc_core.config import DEMO_MODEL_DIR
from fmmtc_core.store import open_database, row_counts

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "app.py")


@pytest.fixture(scope="module", autouse=True)
def _worker_stopped_after_the_module():
    """The pages start the server's screening worker in this process: stop it (and check it is
    gone) when the module is done, as a server's exit would."""
    yield
    from fmmtc_app import worker

    started = worker.current()
    worker.shutdown()
    assert worker.current() is None
    if started is not None:
        assert not started.alive


@pytest.fixture
def db(tmp_path, monkeypatch):
    """A fresh cohort database for each test (the app's default location, moved). After the
    test, no staged upload may be left, neither under the data folder nor in the temp folder."""
    import tempfile

    from fmmtc_app import access

    from fmmtc_app import uploads

    access._throttle.clear()  # failed sign-ins of an earlier test do not count here
    monkeypatch.setenv("FMMTC_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "shm").mkdir()
    monkeypatch.setattr(uploads, "MEMORY_FS", tmp_path / "shm")  # uploads staged in memory
    monkeypatch.setenv("FMMTC_DEMO_COHORT_SIZE", "4")
    before = set(Path(tempfile.gettempdir()).glob("fmmtc-upload-*"))
    yield f"sqlite:///{tmp_path / 'data' / 'fmmtc.db'}"
    from fmmtc_app import demo_job

    demo_job.stop()  # a demo job the test left running ends with it
    assert demo_job.wait(600)
    for staged in (tmp_path / "data" / "uploads", tmp_path / "shm" / f"fmmtc-{os.getuid()}"
                   / "uploads"):
        assert not list(staged.glob("upload-*")) if staged.exists() else True
    assert set(Path(tempfile.gettempdir()).glob("fmmtc-upload-*")) <= before


def _app(page: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    if page:
        at.switch_page(f"views/{page}.py")
        at.run()
    assert not at.exception, at.exception
    return at


def _load_demo(at):
    """Start the demo cohort on the Cohort page and wait for its job to end."""
    from fmmtc_app import demo_job

    at.button(key="load_demo").click()
    at.run()
    assert demo_job.wait(900), "the demo cohort job did not end"
    at.run()


def _errors(at):
    return [e.value for e in at.error]


def _cohort_table(at):
    """The cohort page's table of screenings (the worklist above it has no band)."""
    return next(d.value for d in at.dataframe if "band_low" in d.value.columns)


def _problems(at):
    """Errors other than the demo model's validity banner (it learnt from simulated data:
    every page that shows its results says so in an error box)."""
    return [e for e in _errors(at) if "SIMULATED" not in e]


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
    # the Model page says (as an error box) that the demo learnt from simulated data only
    assert [e for e in _errors(at) if "SIMULATED DATA ONLY" not in e] == []


@pytest.mark.slow  # a screening (or four) in the worker
def test_screen_a_nifti_upload_shows_the_result_and_stores_it(db, hcpex_scans):
    nifti = hcpex_scans[1]
    at = _app()
    at.text_input(key="pseudonym").input("PAIN-0042")
    at.file_uploader[0].upload(nifti.name, nifti.read_bytes(), "application/gzip")
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception and not _problems(at), _problems(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Responder probability"].endswith("%")
    assert metrics["Decision"] in ("likely responder", "likely non-responder", "uncertain")
    assert "Completeness gap" in metrics and "Connectivity share" in metrics
    assert any("Saved to the cohort as screening 1" in s.value for s in at.success)
    assert at.subheader[0].value == "Participant PAIN-0042"
    counts = _counts(db)
    assert counts["screenings"] == 1 and counts["region_attributions"] == 426


@pytest.mark.slow  # a screening (or four) in the worker
def test_screen_a_table_with_its_sidecar(db, hcpex_scans):
    table = hcpex_scans[0]
    at = _app()
    at.text_input(key="pseudonym").input("PAIN-0043")
    at.file_uploader[0].upload(table.name, table.read_bytes(), "text/tab-separated-values")
    at.file_uploader[1].upload("side.json", table.with_suffix(".json").read_bytes(),
                               "application/json")
    at.form_submit_button[0].click()
    at.run()
    assert not _problems(at), _problems(at)
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


@pytest.mark.parametrize("field, value", [("Site (optional)", "=cmd|' /C calc'!A0"),
                                          ("Drug (optional)", "<b>x</b>"),
                                          ("Arm (optional)", "a" * 65)])
def test_bad_labels_are_refused_before_the_screening(db, field, value):
    at = _app()
    at.text_input(key="pseudonym").input("PAIN-0044")
    next(t for t in at.text_input if t.label == field).input(value)
    at.file_uploader[0].upload("t.tsv", b"a\tb\n1\t2\n", "text/tab-separated-values")
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception
    errors = _errors(at)
    assert len(errors) == 1 and errors[0].startswith("Not screened: Invalid ")
    assert errors[0].endswith("Nothing was saved.")
    assert all(v == 0 for v in _counts(db).values())


def test_screen_asks_for_pseudonym_and_file(db, tmp_path, grid_labels):
    at = _app()
    at.form_submit_button[0].click()
    at.run()
    assert _errors(at) == ["Enter the participant's study pseudonym first (e.g. PAIN-0042)."]
    at.text_input(key="pseudonym").input("PAIN-1")
    at.form_submit_button[0].click()
    at.run()
    assert _errors(at) == ["Choose a scan file to upload first."]
    at.text_input(key="pseudonym").input("Jane Doe")  # refused by screen(), in the worker
    nifti = save_nifti(tmp_path / "sub-j_bold.nii.gz", make_bold(grid_labels, 20))
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


@pytest.mark.slow  # a screening (or four) in the worker
def test_demo_participant_is_labelled_as_simulated(db):
    at = _app()
    at.button(key="demo").click()
    at.run()
    assert not at.exception and not _problems(at), _problems(at)
    assert any("SIMULATED participant" in i.value for i in at.info)
    assert at.subheader[0].value == "Participant SIM-DEMO"
    # the probability scale is an inline SVG (no plotly.js to load before the card paints)
    scale = [m.value for m in at.markdown if m.value.startswith("<svg")]
    assert len(scale) == 1 and "Responder probability" in scale[0]


@pytest.mark.slow  # a screening (or four) in the worker
def test_cohort_page_demo_cohort_filters_outcomes_and_export(db):
    at = _app("cohort")
    _load_demo(at)
    assert not at.exception and not _problems(at), _problems(at)
    assert any("Loaded 4 simulated participants" in s.value for s in at.success)
    assert any("SIMULATED demo data" in w.value for w in at.warning)
    assert len(_cohort_table(at)) == 4
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
    shown = _cohort_table(at)
    assert 0 < len(shown) < 4 and set(shown["site"]) == {sites[0]}
    # the threshold changes the enrolled count
    at.slider(key="threshold").set_value(0.0)
    at.run()
    enrolled = {m.label: m.value for m in at.metric}["Enrolled"]
    assert enrolled == f"{len(shown)} of {len(shown)}"
    # enter an observed outcome: the demo participants have one, so confirm the replacement
    _record_outcome(at, at.selectbox(key="o_who").options[0], "non-responder", replace=True)
    assert not _problems(at)
    assert any(s.value.startswith("Recorded: ") for s in at.success)
    assert _counts(db)["outcomes"] == 5


def _sidebar_progress(at) -> list[str]:
    return [str(p.proto.text) for p in at.sidebar.get("progress")]


@pytest.mark.slow  # four screenings in the worker
def test_demo_cohort_is_a_job_that_outlives_the_page_and_can_be_resumed_and_reset(db):
    """Loading the demo cohort returns at once and goes on in the background: every page (a
    new session, as after navigating or refreshing) shows its progress in the sidebar; each
    participant's outcome is recorded as it is screened; stopped, it resumes where it
    stopped; reset, the simulated participants are gone. The old page did the whole load in
    its own script run (lost when the user left) and imported the outcomes at the end."""
    import time

    from fmmtc_app import demo_job

    at = _app("cohort")
    at.button(key="load_demo").click()
    at.run()  # returns while the job runs
    assert not at.exception
    assert demo_job.running()
    assert any("demo cohort" in t for t in _sidebar_progress(at)), _sidebar_progress(at)
    other = _app("model")  # another page in a fresh session: the progress is there too
    assert any("demo cohort" in t for t in _sidebar_progress(other)), _sidebar_progress(other)
    deadline = time.time() + 600
    while not demo_job.read_job().done and time.time() < deadline:
        time.sleep(0.5)
    demo_job.stop()
    assert demo_job.wait(600)
    job = demo_job.read_job()
    assert job.status == "stopped" and 1 <= len(job.done) < 4
    counts = _counts(db)
    assert counts["screenings"] == counts["outcomes"] == len(job.done)  # outcome per person
    page = _app("cohort")
    assert any("stopped" in t for t in _sidebar_progress(page))
    page.button(key="demo_resume").click()
    page.run()
    assert demo_job.wait(600)
    page.run()
    assert not page.exception and not _problems(page), _problems(page)
    assert any("Loaded 4 simulated participants" in s.value for s in page.success)
    counts = _counts(db)
    assert counts["screenings"] == counts["outcomes"] == 4  # none screened twice
    assert len(demo_job.read_job().seconds) == 4
    page.button(key="demo_reset").click()
    page.run()
    assert not page.exception
    counts = _counts(db)
    assert counts["participants"] == counts["screenings"] == counts["outcomes"] == 0
    assert demo_job.read_job() is None
    assert any("Load the simulated demo cohort" in b.label for b in page.button)


def test_demo_buttons_act_in_the_click_callback_and_keep_the_error_for_the_page(monkeypatch):
    """The job's buttons act in ``on_click`` (before the page runs again: a page link clicked
    right after would otherwise stop the run that carries the click); an error is kept and
    shown once, beside the button, as a plain sentence."""
    from fmmtc_app import demo
    from fmmtc_core._errors import InvalidInputError

    state: dict = {}
    shown: list[str] = []
    monkeypatch.setattr(demo.st, "session_state", state)
    monkeypatch.setattr(demo, "plain_error",
                        lambda exc, what: shown.append(f"{what}: {exc}"))
    done: list[str] = []
    demo._action("load_demo", "Not started", lambda: done.append("started"))()
    assert done == ["started"] and state == {}
    demo._action("load_demo", "Not started", lambda: (_ for _ in ()).throw(
        InvalidInputError("FMMTC_CLUSTER is not a cluster")))()  # raises inside the callback
    demo._show_error("load_demo")
    demo._show_error("load_demo")
    assert shown == ["Not started: FMMTC_CLUSTER is not a cluster"]


@pytest.mark.slow  # a screening (or four) in the worker
def test_explorer_shows_and_compares_stored_screenings(db):
    at = _app("cohort")
    _load_demo(at)
    at.switch_page("views/explore.py")
    at.run()
    assert not at.exception and not _problems(at), _problems(at)
    labels = {m.label for m in at.metric}
    assert {"Probability", "IG gap"} <= labels
    assert any(md.value.startswith("Decision: **") for md in at.markdown)
    views = at.radio(key="a-view").options
    assert len(views) == 7
    for view in views[1:]:  # every view draws without an error
        at.radio(key="a-view").set_value(view)
        at.run()
        assert not at.exception and not _problems(at), (view, _problems(at))
    at.toggle(key="explore_compare").set_value(True)
    at.run()
    assert not at.exception
    assert len([m for m in at.metric if m.label == "Probability"]) == 2


def test_model_page_shows_the_card(db):
    at = _app("model")
    labels = {m.label: m.value for m in at.metric}
    card = json.loads((DEMO_MODEL_DIR / "model_card.json").read_text())
    assert labels["AUC"] == f"{card['metrics_out_of_fold']['auc']:.3f}"
    assert any("SIMULATED DATA ONLY" in e for e in _errors(at))  # louder than a warning
    frames = [d.value for d in at.dataframe if "model" in d.value.columns]
    # the demo ships fmmtc compare's table (lower-case "auc") beside the ablation study's
    comparison = [f for f in frames if "auc" in f.columns]
    ablation = [f for f in frames if "auc" not in f.columns]
    assert len(comparison) == 1 and "fmmtc" in set(comparison[0]["model"])
    assert len(ablation) == 1 and {"cpm", "oracle"} <= set(ablation[0]["model"])
    assert any(m.startswith("FMM-TC") for m in ablation[0]["model"])
    assert any("generated by `python bench/learning.py" in c.value for c in at.caption)


def test_model_page_says_loudly_when_training_found_nothing(db, tmp_path, monkeypatch):
    """A card whose training collapsed shows its warnings as errors, the AUC interval and
    the calibration used; a comparison where a classic baseline wins says so."""
    import shutil

    from fmmtc_core.config import default_model_dir

    model = tmp_path / "collapsed"
    shutil.copytree(default_model_dir(), model)
    card = json.loads((model / "model_card.json").read_text())
    card["warnings"] = ["COLLAPSED TO THE BASE RATE: every participant gets about the same "
                        "probability (0.50; responder rate 0.50)."]
    card["metrics_out_of_fold"] |= {"auc_ci95": [0.41, 0.62], "calibration": "cross-fitted",
                                    "permutation": {"p_value": 0.4, "n_permutations": 9,
                                                    "null_mean": 0.5, "null_sd": 0.05}}
    (model / "model_card.json").write_text(json.dumps(card))
    (model / "comparison.tsv").write_text("model\tauc\nedges\t0.700\nfmmtc\t0.550\n"
                                          "oracle\t0.900\n")
    monkeypatch.setenv("FMMTC_MODEL_DIR", str(model))
    at = _app("model")
    assert any("COLLAPSED TO THE BASE RATE" in e for e in _errors(at))
    captions = " ".join(c.value for c in at.caption)
    assert "0.410-0.620" in captions and "p = 0.400" in captions and "cross-fitted" in captions
    assert any("not better than the classic baseline edges (AUC 0.700)" in w.value
               for w in at.warning)


def test_a_classic_baseline_model_shows_its_type_and_screens(db, tmp_path, monkeypatch):
    """A folder of `fmmtc train --model amplitude` is a model like FMM-TC's: the Model page
    says it is a classic baseline, and the demo participant is screened and explained with it
    (exactly, and said so)."""
    monkeypatch.setenv("FMMTC_MODEL_DIR", str(classic_folder(tmp_path / "amplitude")))
    at = _app("model")
    assert any("model type **amplitude**" in c.value for c in at.caption)
    assert any("Classic baseline `amplitude`, not the deep FMM-TC model" in i.value
               for i in at.info)
    assert {m.label: m.value for m in at.metric}["AUC"] == "0.610"
    at = _app()
    assert any("classic baseline amplitude, not the deep model" in c.value for c in at.caption)
    at.button(key="demo").click()
    at.run()
    assert not at.exception and not _problems(at), _problems(at)
    # trained on a simulated cohort: the result says so, as for the demo model
    assert any("TRAINED ON SIMULATED DATA ONLY" in e for e in _errors(at))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Time-series share"] == "100%" and metrics["Connectivity share"] == "0%"
    assert any(c.value.startswith("Exact linear attribution") for c in at.caption)


def _store_a_screening(db, pseudonym="LEAK-0001"):
    from fmmtc_core.store import session_scope

    with session_scope(open_database(db), write=True) as s:
        fake_screening(s, pseudonym, site="HIDDEN-SITE")


def _everything_shown(at) -> str:
    parts = []
    for kind in ("title", "header", "subheader", "markdown", "caption", "text", "info",
                 "warning", "error", "success", "metric"):
        for el in getattr(at, kind):
            parts.append(str(getattr(el, "value", "")) + str(getattr(el, "label", "")))
    for el in at.sidebar:
        parts.append(str(getattr(el, "value", "")))
    return "\n".join(parts)


@pytest.mark.parametrize("page", [None, "screen", "explore", "cohort", "model", "qc"])
def test_every_page_is_gated_before_sign_in(db, monkeypatch, page):
    """With a password set, no page (asked for by its path) shows stored data, an upload
    widget or the model before sign-in; the sign-in form is all there is."""
    _store_a_screening(db)
    monkeypatch.setenv("FMMTC_PASSWORD", "s3cret")
    at = AppTest.from_file(APP, default_timeout=300)
    at.run()
    if page:
        try:
            at.switch_page(f"views/{page}.py")
        except Exception:  # noqa: BLE001 - not in the navigation at all: also gated
            pass
        at.run()
    assert not at.exception
    assert not at.file_uploader and not at.dataframe
    shown = _everything_shown(at)
    assert "LEAK-0001" not in shown and "HIDDEN-SITE" not in shown
    assert "fmmtc-demo" not in shown and "Model:" not in shown
    assert [t.value for t in at.title] == ["FMM-TC Screen"]
    assert len(at.text_input) == 2


def test_wrong_passwords_are_throttled_and_audited(db, monkeypatch):
    from sqlalchemy import text

    from fmmtc_app.access import FREE_ATTEMPTS

    monkeypatch.setenv("FMMTC_PASSWORD", "s3cret")
    at = _app()
    at.text_input[0].input("mallory")
    for _ in range(FREE_ATTEMPTS):
        at.text_input[1].input("guess")
        at.form_submit_button[0].click()
        at.run()
        assert _errors(at) == ["That password is not correct. Ask your study coordinator for it."]
    at.text_input[1].input("s3cret")  # the right one, too soon: still refused
    at.form_submit_button[0].click()
    at.run()
    assert _errors(at)[0].startswith("Too many wrong passwords. Try again in")
    assert at.title[0].value == "FMM-TC Screen"
    with open_database(db).connect() as conn:
        rows = conn.execute(text("SELECT actor, action FROM audit_log")).all()
    assert rows == [("not signed in", "sign-in failed")] * FREE_ATTEMPTS


def test_throttle_delays_then_locks_out():
    from fmmtc_app.access import FREE_ATTEMPTS, LOCK_AFTER, LOCK_S, _Throttle

    t, keys, now = _Throttle(), ("client:1.2.3.4",), 1000.0
    for i in range(FREE_ATTEMPTS):
        assert t.wait_s(keys, now + i) == 0
        t.fail(keys, now + i)
    last = now + FREE_ATTEMPTS - 1
    assert t.wait_s(keys, last) == pytest.approx(2.0)  # then 4, 8, ... seconds
    t.fail(keys, last + 2)
    assert t.wait_s(keys, last + 2) == pytest.approx(4.0)
    assert t.wait_s(("client:5.6.7.8",), last) == 0  # another client is not affected
    for i in range(LOCK_AFTER):
        t.fail(keys, last + 3 + i)
    assert t.wait_s(keys, last + 3 + LOCK_AFTER) == pytest.approx(LOCK_S - 1)
    t.clear(keys)
    assert t.wait_s(keys, last + 3 + LOCK_AFTER) == 0


@pytest.mark.slow  # a screening (or four) in the worker
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
    assert not _problems(at)
    with open_database(db).connect() as conn:
        rows = conn.execute(text("SELECT actor, action FROM audit_log")).all()
    assert rows[0] == ("not signed in", "sign-in failed") and rows[1] == ("dr who", "sign-in")
    assert {actor for actor, _ in rows[1:]} == {"dr who"}


# --------------------------------------------------------------------------------------------
# The app is a client of the core
# --------------------------------------------------------------------------------------------
def _imports(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


def test_the_core_never_imports_streamlit():
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "fmmtc_core").rglob("*.py"))
                 if "streamlit" in _imports(p)]
    assert offenders == []


def test_pages_hold_layout_only():
    """No SQL and no array science in a page: they call the core (and fmmtc_app)."""
    for page in sorted((ROOT / "views").glob("*.py")) + [ROOT / "app.py"]:
        assert not _imports(page) & {"numpy", "sqlalchemy", "torch", "scipy"}, page.name


def test_the_worker_module_stays_light():
    """The worker process imports fmmtc_app.worker: no Streamlit there (nor in the package's
    __init__), so a worker does not pay for it."""
    assert "streamlit" not in _imports(ROOT / "fmmtc_app" / "worker.py")
    assert _imports(ROOT / "fmmtc_app" / "__init__.py") == set()


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


# --------------------------------------------------------------------------------------------
# The honesty of a result: what the model is valid for, on every page that shows a result
# --------------------------------------------------------------------------------------------
def _demo_card() -> dict:
    return json.loads((DEMO_MODEL_DIR / "model_card.json").read_text())


REAL_CARD = {"name": "site-model", "data": {"cohort": "/data/pain", "n_subjects": 80,
                                            "n_responders": 30, "simulated": False}}


def _stored(db, card: dict | None, pseudonym="PAIN-0001", **kw) -> int:
    """Store a made-up screening whose model version carries ``card``; return its id."""
    from fmmtc_core.store import repository as repo
    from fmmtc_core.store import session_scope

    with session_scope(open_database(db), write=True) as s:
        if card is not None:  # fake_screening's model version ("f" * 64), with this card
            repo.get_or_create_model_version(s, card.get("name", "m"), "f" * 64, card,
                                             actor="t")
        return fake_screening(s, pseudonym, **kw).id


def _result(db, screening_id: int):
    from fmmtc_core.screening import ScreeningResult
    from fmmtc_core.store import repository as repo
    from fmmtc_core.store import session_scope
    from fmmtc_core.summary import ScreeningSummary

    with session_scope(open_database(db)) as s:
        return ScreeningResult(ScreeningSummary.from_row(repo.get_screening(s, screening_id)))


def _app_with(state: dict, page: str | None = None) -> AppTest:
    """The app with ``state`` in the browser session before the first run (a result card as
    a screening leaves it, without running one)."""
    at = AppTest.from_file(APP, default_timeout=300)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    if page:
        at.switch_page(f"views/{page}.py")
        at.run()
    assert not at.exception, at.exception
    return at


def test_result_card_says_the_demo_model_learnt_from_simulated_data(db):
    """A real (not simulated) participant screened with the demo model: the card says, above
    the decision, that the model was trained on simulated data only."""
    at = _app_with({"screen_result": _result(db, _stored(db, _demo_card()))})
    errors = _errors(at)
    assert any("DEMONSTRATION MODEL - TRAINED ON SIMULATED DATA ONLY" in e
               and "says nothing about a real person" in e for e in errors), errors
    assert any("Decision" == m.label for m in at.metric)


def test_result_card_says_a_real_model_is_not_validated_here(db):
    at = _app_with({"screen_result": _result(db, _stored(db, REAL_CARD))})
    assert any("NOT VALIDATED ON THIS SITE'S DATA" in w.value for w in at.warning)
    assert not any("SIMULATED DATA ONLY" in e for e in _errors(at))


def test_a_validated_model_shows_no_validity_warning(db):
    card = REAL_CARD | {"site_validation": {"site": "leeds", "n_subjects": 40}}
    at = _app_with({"screen_result": _result(db, _stored(db, card))})
    assert not any("VALIDATED" in w.value for w in at.warning) and not _errors(at)


def test_explorer_and_cohort_say_which_results_come_from_a_simulated_model(db, aal3):
    _stored(db, _demo_card(), n_regions=aal3.n_regions, atlas="aal3")
    at = _app("explore")
    assert any("DEMONSTRATION MODEL - TRAINED ON SIMULATED DATA ONLY" in e
               for e in _errors(at)), _errors(at)
    at.switch_page("views/cohort.py")
    at.run()
    assert not at.exception
    assert any("1 of 1 screenings were made by a model trained on SIMULATED data" in e
               for e in _errors(at)), _errors(at)
    shown = _cohort_table(at)
    assert list(shown["model_validity"]) == ["simulated"]


def test_model_page_states_what_the_model_is_valid_for(db):
    at = _app("model")
    shown = _everything_shown(at)
    assert "**Valid for:** Trying out the software" in shown
    assert "DEMONSTRATION MODEL - TRAINED ON SIMULATED DATA ONLY" in shown


# --------------------------------------------------------------------------------------------
# Unknown head motion is a warning, shown as such
# --------------------------------------------------------------------------------------------
def test_qc_page_says_motion_is_unknown_without_confounds(db, tmp_path, grid_labels):
    path = save_nifti(tmp_path / "sub-01_bold.nii.gz", make_bold(grid_labels))
    at = _app("qc")
    at.selectbox[0].set_value("aal3")
    at.file_uploader[0].upload("sub-01_bold.nii.gz", path.read_bytes(), "application/gzip")
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception and not at.success  # never "Passed quality control"
    assert [w.value for w in at.warning] == ["Usable, with warnings"]
    assert any(m.value.startswith("- Head motion is unknown: no fMRIPrep confounds file")
               for m in at.markdown)
    assert {m.label: m.value for m in at.metric}["Mean FD (mm)"] == "unknown"


def test_result_card_shows_unknown_motion_as_a_warning(db):
    reason = ("Head motion is unknown: no fMRIPrep confounds file was given, so framewise "
              "displacement (FD) could not be measured.")
    qc = {"verdict": "warn", "reasons": [reason], "n_volumes": 100, "tr_s": 2.0,
          "n_regions": 3, "uncovered_regions": [], "tsnr_median": None, "fd_mean_mm": None,
          "motion_known": False}
    at = _app_with({"screen_result": _result(db, _stored(db, _demo_card(), qc=qc))})
    qc_box = next(e for e in at.expander if e.label.startswith("Scan quality"))
    assert qc_box.label == "Scan quality: warn (head motion unknown)"
    metrics = {m.label: m.value for m in qc_box.metric}
    assert metrics["Mean FD (mm)"] == "unknown" and metrics["Regions covered"] == "3 / 3"
    assert any(reason in m.value for m in qc_box.markdown)


# --------------------------------------------------------------------------------------------
# A 0 % time-series share says what it means and why
# --------------------------------------------------------------------------------------------
HELD_TS = {"share_ts": 0.0, "share_fc": 1.0, "explanation": {
    "baseline": {"ts": "held at the scan (not attributed)", "fc": "cohort_mean"}}}


def test_result_card_explains_a_zero_time_series_share(db):
    at = _app_with({"screen_result": _result(db, _stored(db, _demo_card(), fields=HELD_TS))})
    assert {m.label: m.value for m in at.metric}["Time-series share"] == "0%"
    assert any("held the time-series encoder's input fixed" in c.value
               and "0 % by construction" in c.value for c in at.caption)


def test_explorer_explains_a_small_time_series_share(db, aal3):
    fields = {"share_ts": 0.003, "share_fc": 0.997,
              "explanation": {"baseline": {"ts": "flat", "fc": "cohort_mean"}}}
    _stored(db, _demo_card(), n_regions=aal3.n_regions, atlas="aal3", fields=fields)
    at = _app("explore")
    assert {m.label: m.value for m in at.metric}["Time series / connectivity"] == \
        "0.3% / 99.7%"
    assert any("The time-series share is genuinely small (0.3%)" in c.value
               for c in at.caption)


# --------------------------------------------------------------------------------------------
# The report: for any past screening, as HTML and PDF
# --------------------------------------------------------------------------------------------
def _downloads(at) -> list[str]:
    return [el.proto.label for el in at.get("download_button")]


def test_result_card_offers_the_report_as_html_and_pdf(db):
    at = _app_with({"screen_result": _result(db, _stored(db, _demo_card()))})
    assert {"Download the report (HTML)", "Download the report (PDF)"} <= set(_downloads(at))


def test_any_past_screening_has_its_report_in_the_explorer_and_the_cohort_page(db, aal3):
    first = _stored(db, _demo_card(), n_regions=aal3.n_regions, atlas="aal3")
    _stored(db, _demo_card(), "PAIN-0002", sha="b" * 64, n_regions=aal3.n_regions,
            atlas="aal3")
    at = _app("explore")
    assert [d for d in _downloads(at) if "report" in d] == [
        "Download the report (HTML)", "Download the report (PDF)"]
    at.switch_page("views/cohort.py")
    at.run()
    before = _downloads(at)
    pick = at.selectbox(key="report_pick")
    assert pick.value is None and len(pick.options) == 2  # nothing drawn until one is chosen
    pick.set_value(first)
    at.run()
    assert not at.exception and not _problems(at)
    assert _downloads(at) == before + ["Download the report (HTML)",
                                       "Download the report (PDF)"]


# --------------------------------------------------------------------------------------------
# One image, one participant: whatever side files come (or do not come) with it
# --------------------------------------------------------------------------------------------
def test_same_scan_without_side_files_under_another_pseudonym_is_refused(db, tmp_path,
                                                                          grid_labels):
    """The image was stored for PAIN-0001 (uploaded with its sidecar and confounds); the same
    image uploaded alone under PAIN-0002 is refused with whose it is, and nothing is stored."""
    import hashlib

    nifti = save_nifti(tmp_path / "sub-a_bold.nii.gz", make_bold(grid_labels, 60))
    data = nifti.read_bytes()
    _stored(db, None, "PAIN-0001", sha=hashlib.sha256(data).hexdigest())
    before = _counts(db)
    at = _app()
    at.text_input(key="pseudonym").input("PAIN-0002")
    at.file_uploader[0].upload("renamed_bold.nii.gz", data, "application/gzip")
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception
    assert _errors(at) == [
        "This scan was already screened for participant "
        "'PAIN-0001'; a scan belongs to one participant (whatever sidecar or confounds come "
        "with it). Check the pseudonym."]
    assert _counts(db) == before


# --------------------------------------------------------------------------------------------
# Outcomes: no default, a confirmation to replace one, the history kept and shown
# --------------------------------------------------------------------------------------------
def _record_outcome(at, who, what=None, replace=None):
    at.selectbox(key="o_who").set_value(who)
    at.run()
    if what is not None:
        at.radio(key="o_what").set_value(what)
    if replace:
        at.checkbox(key="o_replace").check()
    next(b for b in at.button if b.label == "Record outcome").click()
    at.run()
    assert not at.exception


def test_outcome_has_no_default_and_replacing_one_needs_confirmation(db):
    _stored(db, REAL_CARD)
    at = _app("cohort")
    assert at.radio(key="o_what").value is None  # no outcome preselected
    _record_outcome(at, "PAIN-0001")
    assert "Choose the observed outcome (responder or non-responder) first." in _errors(at)
    assert _counts(db)["outcomes"] == 0
    _record_outcome(at, "PAIN-0001", "responder")
    assert any(s.value.startswith("Recorded: PAIN-0001 is a responder") for s in at.success)
    assert _counts(db)["outcomes"] == 1
    assert at.radio(key="o_what").value is None  # the next entry starts empty again
    # a second outcome: refused until the replacement is confirmed
    _record_outcome(at, "PAIN-0001", "non-responder")
    assert any("PAIN-0001 already has an observed outcome: responder" in e
               for e in _errors(at)), _errors(at)
    assert _counts(db)["outcomes"] == 1
    _record_outcome(at, "PAIN-0001", "non-responder", replace=True)
    assert _counts(db)["outcomes"] == 2
    history = next(d.value for d in at.dataframe if "entered_by" in d.value.columns)
    assert list(history["outcome"]) == ["non-responder", "responder"]
    table = _cohort_table(at)
    assert list(table["outcome"]) == ["non-responder"]


# --------------------------------------------------------------------------------------------
# A worklist: search participants, filter by status, open one in the explorer
# --------------------------------------------------------------------------------------------
def _worklist(at):
    return next(d.value for d in at.dataframe if "status" in d.value.columns)


def test_worklist_searches_filters_and_opens_a_participant(db, aal3):
    from fmmtc_core.store import repository as repo
    from fmmtc_core.store import session_scope

    kw = {"n_regions": aal3.n_regions, "atlas": "aal3"}
    _stored(db, REAL_CARD, "PAIN-0001", site=None, **kw)
    second = _stored(db, REAL_CARD, "PAIN-0002", sha="b" * 64, site="york", **kw)
    with session_scope(open_database(db), write=True) as s:
        repo.record_outcome(s, "PAIN-0001", "responder", actor="alice")
    at = _app("cohort")
    assert _worklist(at)["participant"].tolist() == ["PAIN-0002", "PAIN-0001"]
    # a label that was not given is a dash, not Streamlit's "None" (read as a site's name)
    assert _worklist(at)["site"].tolist() == ["york", "—"]
    assert _cohort_table(at).set_index("participant").loc["PAIN-0002", "outcome"] == (
        "not recorded")
    at.text_input(key="w_search").input("YORK")
    at.run()
    assert _worklist(at)["participant"].tolist() == ["PAIN-0002"]
    at.text_input(key="w_search").input("")
    at.radio(key="w_status").set_value("outcome recorded")
    at.run()
    assert _worklist(at)["participant"].tolist() == ["PAIN-0001"]
    # the outcome stands in the status column (a column of its own was cut off at 1280 px)
    assert _worklist(at)["status"].tolist() == ["responder"]
    assert "outcome" not in _worklist(at).columns
    at.radio(key="w_status").set_value("awaiting outcome")
    at.run()
    assert _worklist(at)["status"].tolist() == ["awaiting outcome"]
    assert at.selectbox(key="w_open").options == ["PAIN-0002"]
    assert at.button(key="w_go").disabled  # nothing chosen, nothing to open
    at.selectbox(key="w_open").set_value("PAIN-0002")
    at.run()
    at.button(key="w_go").click()
    at.run()
    assert not at.exception
    assert at.title[0].value == "Attribution explorer"
    assert at.selectbox(key="explore_first").value == second


# --------------------------------------------------------------------------------------------
# Progress: the label names the stage that runs, and the bar is in sight above the form
# --------------------------------------------------------------------------------------------
#: The events a screening sends, in order (fmmtc_core.screening.screen announces each stage).
SCREEN_EVENTS = [("validate", 0, 1), ("validate", 1, 1), ("parcellate", 0, 1),
                 ("parcellate", 1, 1), ("qc", 0, 1), ("qc", 1, 1), ("clean", 0, 1),
                 ("clean", 1, 1), ("predict", 0, 1), ("predict", 1, 1), ("explain", 0, 1),
                 ("explain", 1, 4), ("explain", 2, 4), ("save", 0, 1), ("save", 1, 1)]


def test_stage_progress_labels_the_stage_that_runs():
    from fmmtc_app.progress import STAGE_TEXT, StageProgress

    p, seen = StageProgress(), {}
    for stage, done, total in SCREEN_EVENTS:
        seen[(stage, done, total)] = p.update(stage, done, total)
    assert seen[("predict", 0, 1)][1] == "Predicting..."
    # predicting is over: the explanation runs now, and the bar says so
    assert seen[("predict", 1, 1)][1] == STAGE_TEXT["explain"]
    assert seen[("explain", 2, 4)][1] == STAGE_TEXT["explain"]
    assert seen[("save", 0, 1)][1] == STAGE_TEXT["save"]
    assert seen[("save", 1, 1)] == (1.0, "Done.")
    fractions = [f for f, _ in seen.values()]
    assert fractions == sorted(fractions) and fractions[0] == 0.0


def test_screen_page_progress_is_above_the_form_and_never_a_stage_late(db, monkeypatch):
    from streamlit.delta_generator import DeltaGenerator

    from fmmtc_app import session

    stored = _result(db, _stored(db, _demo_card()))
    shown, after = [], {}
    real_progress = DeltaGenerator.progress

    def spy(self, value, text=None, **kw):
        shown.append(text)
        return real_progress(self, value, text=text, **kw)

    def fake_run(source, participant, *, progress=None, **kwargs):
        for stage, done, total in SCREEN_EVENTS:
            progress(stage, done, total, {})
            after[(stage, done, total)] = shown[-1]
        return stored

    monkeypatch.setattr(DeltaGenerator, "progress", spy)
    monkeypatch.setattr(session, "run_screening", fake_run)
    at = _app()
    at.text_input(key="pseudonym").input("PAIN-0001")
    at.file_uploader[0].upload("t.tsv", b"a\tb\n1\t2\n", "text/tab-separated-values")
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception and not _problems(at), _problems(at)
    assert after[("predict", 1, 1)] == "Explaining the prediction..."
    assert after[("explain", 0, 1)] == "Explaining the prediction..."
    assert after[("save", 0, 1)] == "Saving to the cohort database..."
    # the bar stays where it ran, above the form, and says it is done
    order = list(at.main.children.values())
    bar = next(i for i, n in enumerate(order) if type(n).__name__ == "Progress")
    form = next(i for i, n in enumerate(order) if type(n).__name__ == "Expander")
    assert bar < form and order[bar].proto.text == "Done: screening 1."


# --------------------------------------------------------------------------------------------
# The clinician's experience: anatomy, readable figures, QC views (issue 17)
# --------------------------------------------------------------------------------------------
def _store_hcpex_screenings(db, decisions=("likely non-responder",), seed=0):
    """Store screenings of HCPEx scans with made-up attributions (no model, no worker), as an
    older version wrote them: every region's stored group is the stale 'Frontal'."""
    import numpy as np

    from fmmtc_core.atlas import load_atlas
    from fmmtc_core.store import session_scope
    from fmmtc_core.store import repository as repo

    atlas = load_atlas("hcpex")
    rng = np.random.default_rng(seed)
    engine = open_database(db)
    ids = []
    with session_scope(engine, write=True) as s:
        # a model validated at this site: no validity banner to tell apart from real errors
        card = REAL_CARD | {"name": "m", "site_validation": {"site": "test", "n_subjects": 40}}
        mv = repo.get_or_create_model_version(s, "m", "f" * 64, card, actor="t")
        for k, decision in enumerate(decisions):
            p = repo.get_or_create_participant(s, f"PAIN-{k:04d}", actor="t", site="S1")
            prob = {"likely responder": 0.8, "uncertain": 0.5}.get(decision, 0.2)
            scan = {"sha256": f"{k:064x}", "kind": "table", "shape": [50, 426], "tr": 2.0,
                    "atlas": "hcpex", "qc_verdict": "pass", "qc": {"reasons": []},
                    "n_volumes": 50, "n_regions": 426,
                    "series": repo.encode_series(np.zeros((50, 426), np.float32))}
            fields = {"inputs_sha256": f"{k:064x}", "probability": prob,
                      "band_low": prob - 0.1, "band_high": prob + 0.1,
                      "fold_probabilities": [prob], "decision": decision,
                      "thresholds": {"responder": 0.6, "non_responder": 0.4},
                      "share_ts": 0.4, "share_fc": 0.6, "ig_gap": 0.001, "ig_steps": 8,
                      "explanation": {}, "runtime_s": 1.0, "stage_seconds": {},
                      "software_version": "0"}
            # later screenings are (much) stronger: compare mode must still share one scale
            ts = rng.normal(0, 0.01 * 10 ** k, 426)
            fc = rng.normal(0, 0.01 * 10 ** k, 426)
            regions = [{"region_index": i, "label": int(atlas.labels[i]), "name": atlas.names[i],
                        "network": "Frontal", "ts": float(ts[i]), "fc": float(fc[i]),
                        "total": float(ts[i] + fc[i])} for i in range(426)]
            conns = [{"rank": 0, "region_i": 0, "region_j": 1, "label_i": 1, "label_j": 2,
                      "score": 0.5}]
            ids.append(repo.add_screening(
                s, participant=p, model_version=mv, scan_fields=scan, screening_fields=fields,
                regions=regions, connections=conns, actor="t").id)
    engine.dispose()
    return ids


def test_explorer_groups_by_the_atlas_anatomy_not_a_stored_network(db):
    _store_hcpex_screenings(db)
    at = _app("explore")
    assert not _errors(at), _errors(at)
    table = at.dataframe[0].value
    assert "network" not in table.columns and {"lobe", "section"} <= set(table.columns)
    assert set(table["lobe"]) != {"Frontal"}  # the atlas's lobes, not the stale stored group
    at.radio(key="a-view").set_value("By anatomy")
    at.run()
    assert not at.exception and not _errors(at), _errors(at)
    by = at.radio(key="a-by")
    assert by.options == ["Lobe", "HCP-MMP section / subcortical structure"]
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert figure["layout"]["yaxis"]["title"]["text"] == "Lobe"
    by.set_value("section")
    at.run()
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert figure["layout"]["yaxis"]["title"]["text"] == "HCP-MMP section / subcortical structure"
    groups = set(figure["data"][0]["y"])
    assert "Somatosensory and Motor" in groups and "Thalamus" in groups


def test_the_landing_page_says_when_the_password_gate_is_off(db, monkeypatch):
    from streamlit import config as st_config

    at = _app()
    notes = [w.value for w in at.warning if "password gate is off" in w.value]
    assert len(notes) == 1 and "FMMTC_PASSWORD" in notes[0]
    assert "127.0.0.1 only" in notes[0]  # .streamlit/config.toml: loopback
    assert any("Password gate off" in c.value for c in at.sidebar.caption)
    at.switch_page("views/model.py")
    at.run()
    assert not [w for w in at.warning if "password gate is off" in w.value]  # landing page only
    # Listening on every interface with the gate off: said loudly.
    before = st_config.get_option("server.address")
    st_config.set_option("server.address", "0.0.0.0")
    try:
        at = _app()
        notes = [w.value for w in at.warning if "password gate is off" in w.value]
        assert "anyone who can reach this computer over the network" in notes[0]
    finally:
        st_config.set_option("server.address", before)
    # With a password, after sign-in: no notice.
    monkeypatch.setenv("FMMTC_PASSWORD", "s3cret")
    at = _app()
    at.text_input[0].input("dr who")
    at.text_input[1].input("s3cret")
    at.form_submit_button[0].click()
    at.run()
    assert at.title[0].value == "Screen a participant"
    assert not [w for w in at.warning if "password gate" in w.value]


def test_the_server_listens_on_loopback_unless_configured():
    import re
    import tomllib

    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert cfg["server"]["address"] == "127.0.0.1"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^ADDRESS \?= 127\.0\.0\.1$", makefile, re.M)
    run = re.search(r"^run:.*\n\t(.*)$", makefile, re.M).group(1)
    assert "--server.address $(ADDRESS)" in run
    # The image listens on every interface inside its container (or -p could not reach it);
    # the README publishes it on loopback.
    cmd = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.startswith("CMD")]
    assert '"--server.address", "0.0.0.0"' in cmd[0]
    assert "docker run -p 127.0.0.1:8501:8501" in (ROOT / "README.md").read_text()


def test_explorer_compare_mode_is_readable_and_shares_one_scale(db):
    """Compare mode: decisions in full (not cut to a metric's width), both glass brains on one
    colour scale and both bar charts on one axis range, although the second screening's
    attributions are ten times stronger."""
    first, second = _store_hcpex_screenings(db, ("likely non-responder", "uncertain"))
    at = _app("explore")
    at.toggle(key="explore_compare").set_value(True)
    at.run()
    assert not at.exception and not _errors(at), _errors(at)
    assert "Decision" not in {m.label for m in at.metric}
    decisions = [md.value for md in at.markdown if md.value.startswith("Decision: ")]
    assert sorted(decisions) == ["Decision: **likely non-responder**", "Decision: **uncertain**"]
    scales = [c.value for c in at.caption if c.value.startswith("Colour scale ")]
    assert len(scales) == 2 and scales[0] == scales[1] and "both maps share" in scales[0]
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert len(charts) == 2
    ranges = [c["layout"]["xaxis"]["range"] for c in charts]
    assert ranges[0] == ranges[1] and ranges[0][0] == -ranges[0][1]
    for chart in charts:  # names level and short enough, the legend above the bars
        assert all(bar["orientation"] == "h" for bar in chart["data"])
        assert max(len(y) for y in chart["data"][0]["y"]) <= 31
        assert chart["layout"]["legend"]["y"] >= 1
    for key in ("a-view", "b-view"):
        at.radio(key=key).set_value("By anatomy")
    at.run()
    assert not _errors(at), _errors(at)
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert charts[0]["layout"]["xaxis"]["range"] == charts[1]["layout"]["xaxis"]["range"]


def test_explorer_offers_slices_and_the_attribution_map_as_nifti(db):
    _store_hcpex_screenings(db)
    at = _app("explore")
    downloads = [b for b in at.get("download_button")
                 if b.proto.label == "Download the attribution map (NIfTI)"]
    assert len(downloads) == 1 and downloads[0].proto.url.endswith(".gz")
    at.radio(key="a-view").set_value("Slices")
    at.run()
    assert not at.exception and not _errors(at), _errors(at)
    cut = at.slider(key="a-cut")
    frame = at.get("iframe")[0].proto.srcdoc
    assert "brainsprite" in frame.lower() and "https://" not in frame
    cut.set_value(cut.max)  # hide (almost) everything: another map
    at.run()
    assert at.get("iframe")[0].proto.srcdoc != frame
    assert any("cannot be drawn here" in c.value for c in at.caption)


def test_qc_page_shows_alignment_tsnr_fd_and_uncovered_regions(db, tmp_path, grid_labels):
    from conftest import fmriprep_confounds

    path = save_nifti(tmp_path / "sub-01_bold.nii.gz", make_bold(grid_labels))
    conf = tmp_path / "sub-01_desc-confounds_timeseries.tsv"
    fmriprep_confounds(60, spikes=(10, 30)).to_csv(conf, sep="\t", index=False, na_rep="n/a")
    at = _app("qc")
    at.selectbox[0].set_value("aal3")
    at.file_uploader[0].upload("sub-01_bold.nii.gz", path.read_bytes(), "application/gzip")
    at.file_uploader[2].upload(conf.name, conf.read_bytes(), "text/tab-separated-values")
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception and not _errors(at), _errors(at)
    captions = [i.proto.imgs[0].caption for i in at.get("image")]
    assert any("outline of the atlas" in c for c in captions)
    assert any("Temporal SNR" in c for c in captions)
    assert any("never stored" in c.value and "at upload" in c.value for c in at.caption)
    titles = [json.loads(c.proto.spec)["layout"].get("xaxis", {}).get("title", {}).get("text")
              for c in at.get("plotly_chart")]
    assert "framewise displacement (mm)" in titles  # the FD histogram
    # uncovered regions by name (the 6 mm test grid loses AAL3's smallest regions)
    n_uncovered = int({m.label: m.value for m in at.metric}["Uncovered regions"].split(" / ")[0])
    assert n_uncovered > 0
    named = [md.value for md in at.markdown if md.value.startswith("**Uncovered regions**")]
    assert len(named) == 1 and f"({n_uncovered})" in named[0]
    tables = [d.value for d in at.dataframe if "covered" in d.value.columns]
    assert len(tables) == 2  # the uncovered regions, then all regions
    assert len(tables[0]) == n_uncovered and not tables[0]["covered"].any()
    assert {"lobe", "coverage"} <= set(tables[0].columns)


def test_a_spawned_worker_does_not_run_the_dashboard(tmp_path):
    # multiprocessing's spawn imports the parent's __main__ file in the child as __mp_main__
    # (runpy.run_path, run_name="__mp_main__"); the screening worker is spawned from a page
    # run, where __main__ is app.py. It used to run the whole dashboard there at its start.
    import subprocess
    import sys

    code = ("import runpy, sys; runpy.run_path(sys.argv[1], run_name='__mp_main__'); "
            "from fmmtc_app import memory; "
            "print(sorted(memory.frozen_points()), 'fmmtc_core.screening' in sys.modules)")
    env = {**os.environ, "FMMTC_DATA_DIR": str(tmp_path / "data")}
    out = subprocess.run([sys.executable, "-c", code, APP], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=300, check=True)
    assert out.stdout.split("\n")[-2] == "[] False"  # no page ran, no pipeline was imported
