"""The screening pipeline: one transaction per screening, reuse, every bad input leaves the
database unchanged, concurrent writers, and a batch killed mid-way."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import fake_screening, fmriprep_confounds, make_bold, save_nifti

from fmmtc_core import InvalidInputError
from fmmtc_core._errors import ModelFileError
from fmmtc_core.cli import main
from fmmtc_core.screening import QCFailedError, decide, screen, screen_batch
from fmmtc_core.simulate import SimulationConfig, write_cohort
from fmmtc_core.store import integrity_check, open_database, row_counts

FAST = {"rel_tol": 0.05}  # explanation tolerance for speed; the explain tests check 1 %


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six simulated HCPEx participants as region tables (the demo model's atlas)."""
    root = tmp_path_factory.mktemp("cohort")
    return write_cohort(root / "cohort", 6, seed=11, fmt="timeseries",
                        config=SimulationConfig(n_volumes=200))


@pytest.fixture(scope="module")
def model():
    from fmmtc_core.models.ensemble import load_model

    return load_model()


@pytest.fixture
def engine(tmp_path):
    return open_database(f"sqlite:///{tmp_path / 'screen.db'}")


def _scans(cohort):
    return sorted(p for p in cohort.glob("sub-*/func/*_timeseries.tsv")
                  if "confounds" not in p.name)


def test_decide():
    assert decide(0.8, (0.7, 0.9)) == "likely responder"
    assert decide(0.8, (0.5, 0.9)) == "uncertain"  # the band reaches below the threshold
    assert decide(0.1, (0.05, 0.3)) == "likely non-responder"
    assert decide(0.5, (0.45, 0.55)) == "uncertain"
    assert decide(0.7, (0.7, 0.7), {"responder": 0.9}) == "uncertain"
    with pytest.raises(InvalidInputError, match="0 <= non_responder <= responder <= 1"):
        decide(0.5, (0.4, 0.6), {"responder": 0.3, "non_responder": 0.5})


def test_screen_stores_everything_in_one_go_and_reuses_it(cohort, model, engine):
    scan = _scans(cohort)[0]
    stages = []
    r = screen(scan, "PAIN-0001", model, engine, site="A", drug="pregabalin",
               explain_kwargs=FAST, operator="alice",
               progress=lambda stage, done, total, info: stages.append(stage))
    assert not r.reused and 0 <= r.probability <= 1
    assert r.band[0] <= r.probability <= r.band[1]
    assert [s for s in dict.fromkeys(stages)] == ["validate", "parcellate", "qc", "clean",
                                                  "predict", "explain", "save"]
    counts = row_counts(engine)
    assert counts == {"participants": 1, "scans": 1, "model_versions": 1, "screenings": 1,
                      "region_attributions": 426, "connection_attributions": 20,
                      "outcomes": 0, "audit_log": 4}
    d = r.to_dict()
    assert d["participant_id"] == "PAIN-0001" and len(d["regions"]) == 426
    assert set(d["stage_seconds"]) >= {"parcellate", "clean", "predict", "explain", "save"}
    again = screen(scan, "PAIN-0001", model, engine, explain_kwargs=FAST)
    assert again.reused and again.screening_id == r.screening_id
    # One shape: the fresh and the stored screening give the same typed summary
    from dataclasses import replace

    from fmmtc_core.report import screening_report_html

    fresh, stored = r.summary, again.summary
    assert replace(stored, reused=False) == replace(
        fresh, regions=stored.regions, fold_probabilities=stored.fold_probabilities)
    assert [x.label for x in stored.regions[:20]] == [x.label for x in fresh.regions[:20]]
    assert fresh.created_at.tzinfo is not None and fresh.operator == "alice"
    html = screening_report_html(fresh)
    assert fresh.created_at.strftime("%Y-%m-%d %H:%M UTC") in html
    assert "<th>Operator</th><td>alice</td>" in html and "Median tSNR" in html
    assert again.probability == pytest.approx(r.probability)
    assert [x["label"] for x in again.to_dict()["regions"][:10]] == \
        [x["label"] for x in d["regions"][:10]]
    assert row_counts(engine) == counts
    forced = screen(scan, "PAIN-0001", model, engine, explain_kwargs=FAST, force=True)
    assert not forced.reused and forced.screening_id != r.screening_id
    assert row_counts(engine)["screenings"] == 2 and row_counts(engine)["scans"] == 1
    assert integrity_check(engine) == []


def test_every_stage_is_announced_before_its_work(monkeypatch, cohort, model, engine):
    """Progress says what is running: each stage sends (stage, 0, ...) before it starts, so a
    progress bar never shows the previous stage's label during the next one (it said
    'Predicting...' during the whole explanation)."""
    import fmmtc_core.screening as screening
    from fmmtc_app.progress import StageProgress
    from fmmtc_core.store import repository as repo

    events, shown = [], StageProgress()
    at_work = {}

    def progress(stage, done, total, info):
        events.append((stage, done, total))
        shown.update(stage, done, total)

    def when(name, fn):
        def wrapped(*args, **kwargs):
            at_work[name] = (events[-1], shown.text)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(screening, "explain", when("explain", screening.explain))
    monkeypatch.setattr(screening, "qc_report", when("qc", screening.qc_report))
    monkeypatch.setattr(model, "predict_proba", when("predict", model.predict_proba))
    monkeypatch.setattr(repo, "add_screening", when("save", repo.add_screening))
    screen(_scans(cohort)[5], "PAIN-0009", model, engine, explain_kwargs=FAST,
           progress=progress)
    assert at_work["predict"] == (("predict", 0, 1), "Predicting...")
    assert at_work["explain"] == (("explain", 0, 1), "Explaining the prediction...")
    assert at_work["save"] == (("save", 0, 1), "Saving to the cohort database...")
    assert at_work["qc"][1] == "Checking quality..."
    starts = [stage for stage, done, _ in events if done == 0]
    assert starts == ["validate", "parcellate", "qc", "clean", "predict", "explain", "save"]
    assert events[-1] == ("save", 1, 1) and shown.text == "Done."


def test_stored_series_reproduce_the_prediction(cohort, model, engine):
    from sqlalchemy.orm import Session

    from fmmtc_core.store.models import Scan
    from fmmtc_core.store.repository import decode_series

    r = screen(_scans(cohort)[1], "PAIN-0002", model, engine, explain_kwargs=FAST)
    with Session(engine) as s:
        scan = s.query(Scan).one()
        series = decode_series(scan.series)
    assert series.shape == (200, 426)
    signals = r.analysis.signals
    np.testing.assert_array_equal(series, signals.data.astype(np.float32))
    inputs = model.inputs(signals)  # as training prepared its inputs
    p = model.predict_proba(inputs.window[None], inputs.fc[None],
                            inputs.amplitude[None])["probability"][0]
    assert p == pytest.approx(r.probability, rel=1e-5)


def test_one_scan_belongs_to_one_participant(cohort, model, engine):
    scan = _scans(cohort)[2]
    screen(scan, "PAIN-0003", model, engine, explain_kwargs=FAST)
    before = row_counts(engine)
    with pytest.raises(InvalidInputError, match="already screened for participant 'PAIN-0003'"):
        screen(scan, "PAIN-0004", model, engine, explain_kwargs=FAST)
    assert row_counts(engine) == before


def test_same_image_with_other_side_files_keeps_its_participant(tmp_path, cohort, model,
                                                               engine):
    """Identity is the image: left-out (or different) side files neither free the image for
    another pseudonym nor silently add a second screening; --force screens it again."""
    scan = _scans(cohort)[3]
    first = screen(scan, "PAIN-0005", model, engine, explain_kwargs=FAST)
    copy = tmp_path / "sub-x_seg-HCPEx_timeseries.tsv"  # the same bytes, without its sidecar
    copy.write_bytes(scan.read_bytes())
    side = tmp_path / "other.json"
    side.write_text(json.dumps({"RepetitionTime": 2.0, "Atlas": "HCPEx"}))
    before = row_counts(engine)
    with pytest.raises(InvalidInputError, match="already screened for participant 'PAIN-0005'"):
        screen(copy, "PAIN-0006", model, engine, sidecar=side, explain_kwargs=FAST)
    with pytest.raises(InvalidInputError, match="with other side files .* use --force"):
        screen(copy, "PAIN-0005", model, engine, sidecar=side, explain_kwargs=FAST)
    assert row_counts(engine) == before
    again = screen(copy, "PAIN-0005", model, engine, sidecar=side, explain_kwargs=FAST,
                   force=True)
    assert not again.reused and again.screening_id != first.screening_id
    assert row_counts(engine)["scans"] == 1


def test_same_image_without_its_side_files_is_refused_for_another_pseudonym(tmp_path, cohort,
                                                                           model, engine):
    """The reported case: the first upload brings the JSON sidecar and the confounds, the
    second the same image alone under another pseudonym. The image is the identity, so the
    second is refused, saying whose it is, and nothing is stored."""
    scan = _scans(cohort)[4]
    side = scan.with_suffix(".json")
    conf = next(scan.parent.glob("*desc-confounds_timeseries.tsv"))
    screen(scan, "PAIN-0007", model, engine, sidecar=side, confounds=conf,
           explain_kwargs=FAST)
    alone = tmp_path / "upload" / "scan.tsv"  # the same bytes, no sidecar beside it
    alone.parent.mkdir()
    alone.write_bytes(scan.read_bytes())
    before = row_counts(engine)
    with pytest.raises(InvalidInputError,
                       match=r"^This scan was already screened for participant 'PAIN-0007'; a "
                             r"scan belongs to one participant \(whatever sidecar or confounds "
                             r"come with it\)\. Check the pseudonym\.$"):
        screen(alone, "PAIN-0008", model, engine, explain_kwargs=FAST)
    assert row_counts(engine) == before
    from fmmtc_core.store.repository import screenings_frame

    assert list(screenings_frame(engine)["participant"]) == ["PAIN-0007"]


def _race(monkeypatch, url, model, scan, pseudonyms):
    """Screen ``scan`` under each pseudonym in two threads that both finish computing before
    either stores (a barrier after the analysis): each has looked up the database and found
    nothing, so only the write transaction and the schema can keep the outcome right."""
    import threading

    import fmmtc_core.screening as screening
    from fmmtc_core.store import make_engine

    barrier = threading.Barrier(len(pseudonyms))
    real = screening.analyse

    def analyse_then_wait(*args, **kwargs):
        result = real(*args, **kwargs)
        barrier.wait(timeout=300)
        return result

    monkeypatch.setattr(screening, "analyse", analyse_then_wait)
    outcomes: dict = {}

    def run(i, name):
        try:
            # two explanations run at once here: a small fixed batch keeps the pair within
            # what one explanation with the automatic batch size would use
            outcomes[i] = screen(scan, name, model, make_engine(url),
                                 explain_kwargs={**FAST, "internal_batch_size": 2})
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            outcomes[i] = exc

    threads = [threading.Thread(target=run, args=item) for item in enumerate(pseudonyms)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return [outcomes[i] for i in range(len(pseudonyms))]


def _race_outcomes(monkeypatch, url, model, cohort):
    engine = open_database(url)
    # two pseudonyms, one image: one is stored, the other is refused
    a, b = _race(monkeypatch, url, model, _scans(cohort)[4], ["TWIN-0", "TWIN-1"])
    stored = [r for r in (a, b) if not isinstance(r, Exception)]
    refused = [r for r in (a, b) if isinstance(r, Exception)]
    assert len(stored) == 1 and len(refused) == 1, (a, b)
    assert isinstance(refused[0], InvalidInputError), refused[0]
    assert f"already screened for participant {stored[0].participant!r}" in str(refused[0])
    counts = row_counts(engine)
    assert counts["scans"] == 1 and counts["screenings"] == 1 and counts["participants"] == 1
    # one pseudonym, one image, twice at once: one screening, the other returns it
    a, b = _race(monkeypatch, url, model, _scans(cohort)[5], ["SAME-1", "SAME-1"])
    assert not isinstance(a, Exception) and not isinstance(b, Exception), (a, b)
    assert a.screening_id == b.screening_id and sorted([a.reused, b.reused]) == [False, True]
    counts = row_counts(engine)
    assert counts["scans"] == 2 and counts["screenings"] == 2 and counts["participants"] == 2
    assert integrity_check(engine) == []


def test_racing_writers_sqlite(monkeypatch, tmp_path, cohort, model):
    _race_outcomes(monkeypatch, f"sqlite:///{tmp_path / 'race.db'}", model, cohort)


@pytest.mark.postgres
def test_racing_writers_postgres(monkeypatch, pg_engine, postgres_url, cohort, model):
    _race_outcomes(monkeypatch, postgres_url, model, cohort)


def _bad_inputs(tmp_path, cohort, grid_labels):
    """(path, kwargs, message) for every class of bad input of the core data path."""
    good = make_bold(grid_labels, 60)
    cases = []

    def nii(name, data, **kw):
        return save_nifti(tmp_path / name, data, **kw)

    p = tmp_path / "empty.nii.gz"
    p.write_bytes(b"")
    cases.append((p, {}, "is empty"))
    p = tmp_path / "magic.nii"
    p.write_bytes(b"\x00" * 500)
    cases.append((p, {}, "wrong magic number"))
    p = tmp_path / "corrupt.nii.gz"
    p.write_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 100)
    cases.append((p, {}, "corrupt gzip"))
    p = tmp_path / "nonnifti.nii.gz"
    p.write_bytes(gzip.compress(b"hello world" * 100))
    cases.append((p, {}, "NIfTI"))
    full = nii("full.nii.gz", good)
    p = tmp_path / "truncated.nii.gz"
    p.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    cases.append((p, {}, "truncated"))
    cases.append((nii("three_d.nii.gz", good[..., 0]), {}, "3D"))
    cases.append((nii("short.nii.gz", good[..., :5]), {}, "volumes"))
    cases.append((nii("nan.nii.gz", np.full_like(good, np.nan)), {}, "NaN"))
    shifted = np.array([[6.0, 0, 0, 400.0], [0, 6.0, 0, 400.0], [0, 0, 6.0, 400.0],
                        [0, 0, 0, 1]])
    cases.append((nii("elsewhere.nii.gz", good, affine=shifted), {}, "MNI"))
    bad_tr = nii("badtr.nii.gz", good, sidecar={"RepetitionTime": -2})
    cases.append((bad_tr, {}, "repetition time"))
    side = tmp_path / "broken.json"
    side.write_text("{not json")
    cases.append((full, {"sidecar": side}, "JSON"))
    conf = tmp_path / "conf.tsv"
    fmriprep_confounds(30).to_csv(conf, sep="\t", index=False)
    cases.append((full, {"confounds": conf}, "rows"))
    table = tmp_path / "sub-x_seg-HCPEx_timeseries.tsv"
    pd.DataFrame(np.random.default_rng(0).standard_normal((100, 50))).to_csv(
        table, sep="\t", index=False)
    cases.append((table, {}, "columns"))
    text = tmp_path / "sub-y_timeseries.tsv"
    text.write_text("a\tb\nfoo\tbar\n")
    cases.append((text, {}, "holds 'foo'; expected numbers"))
    return cases


def test_every_bad_input_leaves_every_table_unchanged(tmp_path, cohort, model, engine,
                                                      grid_labels):
    screen(_scans(cohort)[3], "PAIN-0005", model, engine, explain_kwargs=FAST)
    before = row_counts(engine)
    for path, kwargs, match in _bad_inputs(tmp_path, cohort, grid_labels):
        with pytest.raises(InvalidInputError, match=match) as info:
            screen(path, "PAIN-0099", model, engine, explain_kwargs=FAST, **kwargs)
        assert row_counts(engine) == before, (path.name, str(info.value))
    for bad_id in ("John Smith", "", "1987-03-04", "P/1"):
        with pytest.raises(InvalidInputError, match="pseudonym|date"):
            screen(_scans(cohort)[4], bad_id, model, engine)
    assert row_counts(engine) == before
    assert integrity_check(engine) == []


def test_values_that_overflow_are_refused_and_nothing_non_finite_is_stored(tmp_path, cohort,
                                                                          model, engine):
    """Finite but absurd values (+-1e308 in two regions) pass no stage: refused before the
    database is touched, with the file named."""
    table = pd.read_csv(_scans(cohort)[0], sep="\t")
    table.iloc[:, 3] = 1e308
    table.iloc[::2, 7] = -1e308
    bad = tmp_path / "sub-huge_seg-HCPEx_timeseries.tsv"
    table.to_csv(bad, sep="\t", index=False)
    bad.with_suffix(".json").write_text(_scans(cohort)[0].with_suffix(".json").read_text())
    before = row_counts(engine)
    with pytest.raises(InvalidInputError, match=r"'sub-huge_seg-HCPEx_timeseries.tsv' holds "
                       r"non-finite or out-of-range values as read \(\d+ value\(s\) in 2 "
                       r"region\(s\)"):
        screen(bad, "PAIN-0100", model, engine, explain_kwargs=FAST)
    assert row_counts(engine) == before


def test_a_non_finite_model_output_names_the_model_and_stores_nothing(monkeypatch, cohort,
                                                                      model, engine):
    real = model.predict_proba

    def broken(window, fc, amplitude=None):  # what a NaN calibration or NaN weights give
        out = real(window, fc, amplitude)
        return {**out, "probability": out["probability"] * np.nan}

    monkeypatch.setattr(model, "predict_proba", broken)
    before = row_counts(engine)
    with pytest.raises(ModelFileError, match=r"The model 'fmmtc-demo' gave a non-finite "
                       r"probability .* Nothing was stored"):
        screen(_scans(cohort)[1], "PAIN-0101", model, engine, explain_kwargs=FAST)
    assert row_counts(engine) == before


@pytest.mark.parametrize("field, value", [("site", "=cmd|' /C calc'!A0"),
                                          ("drug", "<script>alert(1)</script>"),
                                          ("arm", "a" * 65), ("operator", "x\ny")])
def test_labels_are_validated_before_any_work(cohort, model, engine, field, value):
    with pytest.raises(InvalidInputError, match=f"Invalid {field} "):
        screen(_scans(cohort)[0], "PAIN-0102", model, engine, **{field: value})
    assert all(v == 0 for v in row_counts(engine).values())


def test_export_neutralises_spreadsheet_formulas(tmp_path):
    """A site stored before labels were validated (or typed into another tool) cannot run as
    a formula in the exported CSV; numbers stay numbers."""
    from fmmtc_core.store import session_scope
    from fmmtc_core.store import repository as repo

    df = pd.DataFrame({"participant": ["P1", "P2", "P3"],
                       "site": ["=cmd|' /C calc'!A0", "+1+1", "@SUM(A1)"],
                       "probability": [-0.5, 0.25, 1.0]})
    text = repo.csv_text(df)
    assert "'=cmd|" in text and "'+1+1" in text and "'@SUM" in text
    back = pd.read_csv(__import__("io").StringIO(text))
    assert back["probability"].tolist() == [-0.5, 0.25, 1.0]
    assert not any(str(v).startswith(("=", "+", "-", "@")) for v in back["site"])
    engine = open_database(f"sqlite:///{tmp_path / 'x.db'}")
    with session_scope(engine, write=True) as s:  # unvalidated, as an old row would be
        fake_screening(s, "OLD-1", site='=HYPERLINK("http://x")')
    out = tmp_path / "e.csv"
    assert main(["db", "export", "--out", str(out), "--db", str(engine.url)]) == 0
    exported = out.read_text()
    assert "'=HYPERLINK" in exported
    assert "=HYPERLINK" not in exported.replace("'=HYPERLINK", "")


def test_hard_qc_failure_stores_nothing_and_says_why(tmp_path, model, engine, grid_labels):
    bold = save_nifti(tmp_path / "sub-q_bold.nii.gz", make_bold(grid_labels, 60))
    conf = tmp_path / "sub-q_desc-confounds_timeseries.tsv"
    fmriprep_confounds(60, fd_scale=3.0).to_csv(conf, sep="\t", index=False, na_rep="n/a")
    with pytest.raises(QCFailedError, match="failed quality control and was not screened") as e:
        screen(bold, "PAIN-0100", model, engine, confounds=conf)
    assert e.value.report.verdict == "fail"
    assert all(v == 0 for v in row_counts(engine).values())


def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_screen_json_outcome_export(tmp_path, cohort, capsys):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    scan = _scans(cohort)[0]
    code, out, err = _cli(["screen", scan, "--db", db, "--json", "--tolerance", "0.05"], capsys)
    assert code == 0, err
    d = json.loads(out)
    assert {"screening_id", "participant_id", "probability", "band", "decision",
            "modality_share", "regions", "ig_gap", "runtime_s"} <= set(d)
    assert d["participant_id"] == scan.name.split("_")[0][4:]  # from the BIDS name
    assert len(d["band"]) == 2 and set(d["modality_share"]) == {"ts", "fc"}
    assert set(d["regions"][0]) == {"label", "name", "score", "ts", "fc", "network"}
    assert d["created_at"].endswith("+00:00") and d["operator"]
    # the demo model learnt from simulated data: the JSON says so, as the export row does
    assert d["model_validity"]["status"] == "simulated" and d["model_validity"]["warning"]
    code, out, _ = _cli(["outcome", d["participant_id"], "responder", "--db", db], capsys)
    assert code == 0 and "recorded" in out
    csv = tmp_path / "export" / "screenings.csv"
    code, out, _ = _cli(["db", "export", "--out", csv, "--db", db], capsys)
    assert code == 0 and "1 screenings" in out
    table = pd.read_csv(csv)
    assert table.loc[0, "outcome"] == "responder"
    assert table.loc[0, "probability"] == pytest.approx(d["probability"])
    assert table.loc[0, "model_validity"] == "simulated"
    assert table.loc[0, "model_warning"].startswith("DEMONSTRATION MODEL - TRAINED ON SIMULATED")
    code, out, _ = _cli(["db", "check", "--db", db], capsys)
    assert code == 0 and "ok" in out


def test_cli_bad_input_exit_2_and_database_unchanged(tmp_path, cohort, capsys):
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    code, out, err = _cli(["screen", _scans(cohort)[0], "--db", db, "--tolerance", "0.05"],
                          capsys)
    assert code == 0, err
    result = out[out.index("\nWARNING: "):].splitlines()[1:]  # after the progress lines
    assert result[0].startswith("WARNING: DEMONSTRATION MODEL - TRAINED ON SIMULATED DATA ONLY")
    assert result[1].startswith("screening 1: participant ")
    engine = open_database(db)
    before = row_counts(engine)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x00" * 10)
    for argv, match in [
        (["screen", bad, "--participant", "P9"], "wrong magic number"),
        (["screen", _scans(cohort)[1], "--participant", "Jane Doe"], "not a valid study"),
        (["screen", tmp_path / "nope.nii.gz", "--participant", "P9"], "No such"),
        (["outcome", "P404", "responder"], "No participant 'P404'"),
        (["screen-batch", tmp_path], "has no participants.tsv"),
        (["db", "export", "--out", tmp_path / "x.xlsx"], "must name a .csv file"),
    ]:
        code, out, err = _cli([*argv, "--db", db], capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert match in lines[0] and "Traceback" not in err
        assert row_counts(engine) == before
    code, _, err = _cli(["screen", _scans(cohort)[1], "--participant", "P1",
                         "--db", "nonsense://"], capsys)
    assert code == 2 and "database" in err.lower()


def test_batch_screens_a_cohort_and_imports_outcomes(tmp_path, cohort, engine):
    url = engine.url.render_as_string(hide_password=False)
    seen = []
    rep = screen_batch(cohort, url=url, import_outcomes=True, explain_kwargs=FAST,
                       progress=lambda done, total, pid: seen.append((done, total)))
    assert len(rep.screened) == 6 and not rep.failed and rep.outcomes == 6
    assert seen[-1] == (6, 6)
    again = screen_batch(cohort, url=url, import_outcomes=True, explain_kwargs=FAST)
    assert len(again.skipped) == 6 and not again.screened and again.outcomes == 0
    counts = row_counts(engine)
    assert counts["screenings"] == 6 and counts["outcomes"] == 6
    from fmmtc_core.store.repository import screenings_frame

    df = screenings_frame(engine)
    assert df["simulated"].all()  # dataset_description.json says Simulated
    assert set(df["site"].dropna()) and df["outcome"].notna().all()


ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _fmmtc(*args):
    return [sys.executable, "-m", "fmmtc_core.cli", *map(str, args)]


def test_four_processes_screen_into_one_sqlite_file(tmp_path, cohort):
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    open_database(db)
    procs = [subprocess.Popen(_fmmtc("screen", scan, "--db", db, "--tolerance", "0.05"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for scan in _scans(cohort)[:4]]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "locked" not in err
    engine = open_database(db)
    counts = row_counts(engine)
    assert counts["screenings"] == 4 and counts["participants"] == 4
    assert counts["model_versions"] == 1 and integrity_check(engine) == []


def _two_processes(url, scan, pseudonyms):
    procs = [subprocess.Popen(_fmmtc("screen", scan, "--participant", name, "--db", url,
                                     "--tolerance", "0.05", "--json"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for name in pseudonyms]
    return [(p.returncode, *out) for p, out in ((p, p.communicate(timeout=600)) for p in procs)]


def _processes_race(url, cohort):
    """Two processes screening one image under two pseudonyms at once: exactly one exits 0, the
    other exits 2 with one error line; the database holds one scan under one pseudonym. The
    same pseudonym twice at once: one screening, both exit 0."""
    open_database(url)
    runs = _two_processes(url, _scans(cohort)[0], ["TWIN-0", "TWIN-1"])
    codes = sorted(code for code, _, _ in runs)
    assert codes == [0, 2], runs
    winner = next(json.loads(out)["participant_id"] for code, out, _ in runs if code == 0)
    err = next(err for code, _, err in runs if code == 2)
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f"already screened for participant {winner!r}" in err
    runs = _two_processes(url, _scans(cohort)[1], ["SAME-1", "SAME-1"])
    assert [code for code, _, _ in runs] == [0, 0], runs
    ids = {json.loads(out)["screening_id"] for _, out, _ in runs}
    assert len(ids) == 1
    counts = row_counts(open_database(url))
    assert counts["scans"] == 2 and counts["screenings"] == 2 and counts["participants"] == 2


@pytest.mark.slow
def test_two_processes_race_sqlite(tmp_path, cohort):
    _processes_race(f"sqlite:///{tmp_path / 'procs.db'}", cohort)


@pytest.mark.slow
@pytest.mark.postgres
def test_two_processes_race_postgres(pg_engine, postgres_url, cohort):
    _processes_race(postgres_url, cohort)


def test_batch_killed_mid_way_leaves_a_sound_database_and_resumes(tmp_path, cohort):
    db_file = tmp_path / "batch.db"
    db = f"sqlite:///{db_file}"
    engine = open_database(db)
    proc = subprocess.Popen(_fmmtc("screen-batch", cohort, "--db", db, "--tolerance", "0.05"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and row_counts(engine)["screenings"] < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stored = row_counts(engine)["screenings"]
    assert 2 <= stored < 6, "the batch should have been killed mid-way"
    assert integrity_check(engine) == []
    assert row_counts(engine)["region_attributions"] == 426 * stored  # no half screening
    done = subprocess.run(_fmmtc("screen-batch", cohort, "--db", db, "--tolerance", "0.05"),
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"screened {6 - stored}, already stored {stored}" in done.stdout
    assert row_counts(engine)["screenings"] == 6 and integrity_check(engine) == []


def test_batch_with_workers(tmp_path, cohort):
    db = f"sqlite:///{tmp_path / 'workers.db'}"
    rep = screen_batch(cohort, url=db, workers=2, explain_kwargs=FAST)
    assert len(rep.screened) == 6 and not rep.failed
    assert row_counts(open_database(db))["screenings"] == 6


def test_batch_reports_failed_scans_and_keeps_the_others(tmp_path, cohort, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(cohort, broken)
    victim = _scans(broken)[0]
    victim.write_text("not\ta\ttable\n")
    db = f"sqlite:///{tmp_path / 'b.db'}"
    code, out, err = _cli(["screen-batch", broken, "--db", db, "--tolerance", "0.05"], capsys)
    assert code == 2
    assert "screened 5" in out and err.count("warning: ") == 1
    assert err.strip().splitlines()[-1].startswith("error: 1 of 6 scans could not be screened")
    assert row_counts(open_database(db))["screenings"] == 5
    assert Path(victim).exists()


def test_a_scan_is_cleaned_as_the_model_was_trained(cohort, model):
    # The card records the training cohort's cleaning; screening follows it, not the defaults.
    import copy

    from fmmtc_core.screening import analyse

    scan = _scans(cohort)[0]
    default = analyse(scan, model, with_explanation=False)
    other = copy.copy(model)
    other.card = copy.deepcopy(model.card)
    other.card["preprocessing"]["cleaning"].update(low_pass=None, high_pass=None)
    unfiltered = analyse(scan, other, with_explanation=False)
    assert default.signals.cleaning["low_pass"] == 0.1
    assert unfiltered.signals.cleaning["low_pass"] is None
    assert not np.allclose(default.signals.data, unfiltered.signals.data)


def test_a_card_with_unknown_cleaning_is_refused(cohort, model):
    import copy

    from fmmtc_core.screening import analyse

    other = copy.copy(model)
    other.card = copy.deepcopy(model.card)
    other.card["preprocessing"]["cleaning"]["despike"] = True
    with pytest.raises(ModelFileError, match=r"preprocessing\.cleaning has settings this "
                                             r"version does not know: despike \(known: "):
        analyse(_scans(cohort)[0], other, with_explanation=False)
