"""The dashboard hands its long work to a Dask cluster when ``FMMTC_CLUSTER`` names one
(:mod:`fmmtc_app.dispatch`); without it, the server's own worker screens exactly as before."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_app import (  # noqa: F401 - db and the worker's stop are fixtures used here
    ROOT, _app, _counts, _errors, _problems, _worker_stopped_after_the_module, db)

from fmmtc_app import dispatch
from fmmtc_core._errors import FMMTCError


@pytest.fixture(autouse=True)
def _cluster_closed():
    """Whatever a test started on a cluster is closed with it (the local cluster's processes
    included: conftest checks that none outlives the run)."""
    yield
    dispatch.shutdown()
    assert dispatch._client is None


@pytest.fixture
def spy(monkeypatch):
    """The local worker, replaced by a spy that records its jobs and refuses them."""
    from fmmtc_app import worker

    calls = []

    def fake_run(model_dir, kind, job, *, progress=None):
        calls.append((kind, job))
        raise FMMTCError("the local worker was asked")

    monkeypatch.setattr(worker, "run", fake_run)
    return calls


def _submit_table(at, name="PAIN-0101"):
    at.text_input(key="pseudonym").input(name)
    at.file_uploader[0].upload("t.tsv", b"a\tb\n1\t2\n", "text/tab-separated-values")
    at.form_submit_button[0].click()
    at.run()


def test_without_a_cluster_the_local_worker_screens(db, spy, monkeypatch):
    monkeypatch.delenv("FMMTC_CLUSTER", raising=False)
    assert dispatch.cluster_spec() is None and dispatch.check(db) is None
    at = _app()
    assert not at.exception and _problems(at) == []
    _submit_table(at)
    assert not at.exception
    assert [kind for kind, _ in spy] == ["screen"]  # the worker got the job, as before
    assert spy[0][1]["participant"] == "PAIN-0101" and spy[0][1]["url"] == db
    assert any("the local worker was asked" in e for e in _errors(at))
    assert dispatch.jobs() == [] and dispatch._client is None  # no cluster was touched


def test_without_a_cluster_dask_is_not_even_imported(tmp_path):
    code = ("import sys; from fmmtc_app import dispatch; "
            "assert dispatch.check('sqlite://') is None; "
            "assert not {'dask', 'distributed'} & set(sys.modules), 'dask imported'")
    env = {k: v for k, v in os.environ.items() if k != "FMMTC_CLUSTER"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("value, match", [
    ("local:zero", "Invalid value for the FMMTC_CLUSTER setting: 'local:zero'"),
    ("local:0", "Invalid value for the FMMTC_CLUSTER setting"),
    ("tcp://sched.example:8786", "FMMTC_CLUSTER=tcp://sched.example:8786 needs a PostgreSQL"),
])
def test_a_bad_cluster_setting_is_a_clear_error_on_the_page_and_changes_nothing(
        db, spy, monkeypatch, value, match):
    monkeypatch.setenv("FMMTC_CLUSTER", value)
    with pytest.raises(dispatch.ClusterSettingError, match=match):
        dispatch.check(db)
    at = _app()
    assert not at.exception
    assert any(match in e for e in _errors(at)), _errors(at)  # said before any upload
    _submit_table(at)
    assert not at.exception
    shown = [e for e in _errors(at) if match in e]
    assert shown and all("Nothing was screened" in e for e in shown)
    assert not any("cannot be used:" in e for e in shown)  # the setting, not the scan
    assert spy == []  # not quietly sent to the local worker either
    assert dispatch.jobs() == [] and dispatch._client is None
    counts = _counts(db)
    assert counts["participants"] == counts["screenings"] == 0

    # The demo cohort is refused the same way, before its job writes anything.
    from fmmtc_app import demo_job

    cohort = _app("cohort")
    cohort.button(key="load_demo").click()
    cohort.run()
    assert not cohort.exception
    assert any(match in e for e in _errors(cohort)), _errors(cohort)
    assert demo_job.read_job() is None and not demo_job.running()
    assert not demo_job.job_folder().exists()


@pytest.mark.slow  # a LocalCluster, a screening and a demo cohort of 2 on it
def test_a_local_cluster_screens_from_the_screen_page_and_loads_the_demo_cohort(
        db, hcpex_scans, spy, monkeypatch):
    from fmmtc_app import demo_job
    from fmmtc_core.config import DEMO_MODEL_DIR

    monkeypatch.setenv("FMMTC_CLUSTER", "local:1")
    table = hcpex_scans[0]
    at = _app()
    assert _problems(at) == []
    at.text_input(key="pseudonym").input("PAIN-0043")
    at.file_uploader[0].upload(table.name, table.read_bytes(), "text/tab-separated-values")
    at.file_uploader[1].upload("side.json", table.with_suffix(".json").read_bytes(),
                               "application/json")
    at.form_submit_button[0].click()
    at.run()
    assert not at.exception and not _problems(at), _problems(at)
    assert any("Saved to the cohort as screening 1" in s.value for s in at.success)
    assert spy == []  # the cluster screened it, not the local worker
    assert _counts(db)["screenings"] == 1
    done = dispatch.jobs()
    assert [(j.participant, j.status) for j in done] == [("PAIN-0043", "done")]
    # A fresh session (a refreshed browser) lists the job and how it ended.
    again = _app()
    assert any("PAIN-0043: stored as screening 1" in c.value for c in again.caption)

    # A page that goes away mid-screening (its progress callback raises, as a rerun's does)
    # and takes its staging folder with it: the job goes on and stores the screening.
    import shutil

    tables = table.parent.parent.parent.glob("sub-*/func/*_seg-HCPEx_timeseries.tsv")
    other = next(p for p in tables if p != table)
    staging = Path(os.environ["FMMTC_DATA_DIR"]) / "uploads"
    page_folder = staging / "upload-test"
    page_folder.mkdir(parents=True)
    source, sidecar = page_folder / other.name, page_folder / "side.json"
    shutil.copy(other, source)
    shutil.copy(other.with_suffix(".json"), sidecar)

    class PageGone(Exception):
        pass

    def gone(*args):
        raise PageGone

    try:
        with pytest.raises(PageGone):
            dispatch.run(DEMO_MODEL_DIR, "screen", {"url": db, "source": str(source),
                                                    "sidecar": str(sidecar),
                                                    "participant": "PAIN-0044"},
                         progress=gone, staging=staging)
    finally:
        shutil.rmtree(page_folder)
    job = dispatch.jobs()[-1]
    assert job.ended.wait(600) and job.status == "done", job.message
    assert _counts(db)["screenings"] == 2
    assert any("Screening PAIN-0044" in c.value or "PAIN-0044: stored as screening 2" in c.value
               for c in _app().caption)
    assert list(staging.iterdir()) == []  # the job's own links are gone with it

    # The demo cohort job (the page offers at least 4; 2 here, started as its button does).
    demo_job.start(db, DEMO_MODEL_DIR, "tester", n=2)
    assert demo_job.wait(900), "the demo cohort job did not end"
    job = demo_job.read_job()
    assert job.status == "done" and len(job.done) == 2 and not job.failed, job
    assert spy == []
    counts = _counts(db)
    assert counts["screenings"] == 4 and counts["outcomes"] == 2
    assert "Demo cohort loaded: 2 of 2" in job.summary()


def test_a_remote_cluster_must_see_the_data_folder(tmp_path, monkeypatch):
    """With tcp://, uploads are staged in the data folder and read there by the workers: a
    worker that does not see it is refused on connecting, before anything is screened."""
    import dask
    from distributed import LocalCluster

    from fmmtc_core.cluster import parse_cluster

    monkeypatch.setenv("FMMTC_DATA_DIR", str(tmp_path / "not-shared"))  # absent everywhere
    scratch = tmp_path / "dask"  # not a dask-scratch-space left in the system's temp folder
    with dask.config.set({"temporary-directory": str(scratch)}), \
            LocalCluster(n_workers=1, processes=False, protocol="tcp://", host="127.0.0.1",
                         dashboard_address=None, local_directory=str(scratch)) as cluster:
        spec = parse_cluster(cluster.scheduler_address)
        with pytest.raises(dispatch.ClusterSettingError,
                           match=r"the data folder .*not-shared .* is not visible on 1 worker"):
            dispatch.client(spec)
        assert dispatch._client is None
        (tmp_path / "not-shared").mkdir()  # now it is there (as on a shared filesystem)
        assert dispatch.client(spec) is dispatch.client(spec)  # one client, kept
        dispatch.shutdown()


@pytest.mark.slow  # the client waits for the scheduler up to CONNECT_TIMEOUT_S
def test_an_unreachable_scheduler_is_a_plain_error():
    from fmmtc_core.cluster import parse_cluster

    with pytest.raises(dispatch.ClusterSettingError,
                       match=r"FMMTC_CLUSTER=tcp://127.0.0.1:1: Cannot reach the Dask "
                             r"scheduler .*Nothing was screened\.$"):
        dispatch.client(parse_cluster("tcp://127.0.0.1:1"))
    assert dispatch._client is None
