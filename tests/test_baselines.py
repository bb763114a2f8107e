"""Classic baselines on FMM-TC's folds: features, estimators, nested selection without leaks,
the oracle, the comparison table and the `fmmtc compare` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fmmtc_core import InvalidInputError
from fmmtc_core.baselines import (
    BASELINES,
    BaselineFeatures,
    CPMClassifier,
    NBSPredictClassifier,
    amplitude_features,
    baseline_features,
    compare,
    cross_validate,
    paired_auc_difference,
    read_planted,
    repeated_auc_interval,
)
from fmmtc_core.bids import read_cohort
from fmmtc_core.cli import main
from fmmtc_core.evaluation import cross_fitted_platt
from fmmtc_core.pipeline import prepare_cohort
from fmmtc_core.preprocess import RegionSignals, prepare
from fmmtc_core.simulate import SimulationConfig, planted_regions, write_cohort
from fmmtc_core.training import _splits

# Small and strong: 24 participants, 4 sites (3 folds are grouped by site), 100 volumes (at 60
# the planted connectivity is still clear, the planted autocorrelation is lost in the noise).
SIM = SimulationConfig(n_volumes=100, fc_effect=0.6, ts_effect=0.6, n_sites=4)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("baselines") / "cohort", 24, seed=2,
                        fmt="timeseries", atlas="aal3", config=SIM)


@pytest.fixture(scope="module")
def subjects(cohort):
    return prepare_cohort(read_cohort(cohort), "aal3")


@pytest.fixture(scope="module")
def no_truth(cohort, tmp_path_factory):
    """The same cohort without its simulation.json (as a real cohort would be)."""
    root = shutil.copytree(cohort, tmp_path_factory.mktemp("real") / "cohort")
    (root / "simulation.json").unlink()
    return root


@pytest.fixture
def cached(monkeypatch, subjects):
    """compare() (and so the command) takes the prepared signals instead of cleaning again."""
    monkeypatch.setattr("fmmtc_core.pipeline.prepare_cohort",
                        lambda cohort, atlas, progress=None, cleaning=None: subjects)


def _labels(root):
    parts = read_cohort(root).participants
    return parts["responder"].to_numpy(), parts["site"].astype(str).to_numpy()


def _synthetic(n=36, n_regions=10, seed=0):
    """Features with a planted effect: edges among regions 0-3, amplitude column 0, oracle."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    iu = np.triu_indices(n_regions, 1)
    edges = rng.normal(0.3, 0.1, (n, iu[0].size)).astype(np.float32)
    planted = (iu[0] < 4) & (iu[1] < 4)
    edges[:, planted] += 0.15 * y[:, None]
    amplitude = rng.standard_normal((n, 4 * n_regions))
    amplitude[:, 0] += 1.0 * y
    oracle = np.column_stack([edges[:, planted].mean(axis=1), amplitude[:, 0]])
    feats = BaselineFeatures(edges=edges, amplitude=amplitude,
                             amplitude_names=[f"f{i}" for i in range(4 * n_regions)],
                             n_regions=n_regions, oracle=oracle)
    return feats, y, np.flatnonzero(planted)


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------
def test_amplitude_features_by_hand(aal3):
    tr, n = 2.0, 240
    t = np.arange(n) * tr
    data = np.zeros((n, aal3.n_regions), dtype=np.float32)
    data[:, 0] = 3.0 * np.sin(2 * np.pi * 0.05 * t)  # inside the ALFF band, 12 full cycles
    data[:, 1] = 3.0 * np.sin(2 * np.pi * 0.2 * t)  # outside it
    data[:, 2:] = np.random.default_rng(0).standard_normal((n, aal3.n_regions - 2))
    data[:, 5] = np.nan  # a region without signal
    sig = RegionSignals(data=data, tr=tr, atlas=aal3, n_voxels=np.ones(aal3.n_regions),
                        coverage=np.ones(aal3.n_regions))
    log_sd, log_alff, falff, ac1 = amplitude_features(sig)
    assert np.exp(log_sd[0]) == pytest.approx(3.0 / np.sqrt(2), rel=0.01)
    assert falff[0] == pytest.approx(1.0, abs=1e-6) and falff[1] == pytest.approx(0.0, abs=1e-6)
    assert log_alff[0] > log_alff[1]
    assert ac1[0] == pytest.approx(np.cos(2 * np.pi * 0.05 * tr), abs=0.01)
    assert abs(ac1[2]) < 0.2  # white noise
    assert np.isnan([log_sd[5], log_alff[5], falff[5], ac1[5]]).all()


def test_edges_are_the_whole_series_connectivity_of_prepare(subjects):
    feats = baseline_features(subjects[:3])
    iu = np.triu_indices(subjects[0].n_regions, 1)
    for i, s in enumerate(subjects[:3]):
        np.testing.assert_array_equal(feats.edges[i], prepare(s, 40).fc[iu])
    assert feats.amplitude.shape == (3, 4 * subjects[0].n_regions)
    assert feats.oracle is None


def test_read_planted_gives_the_simulated_regions(cohort, no_truth, aal3):
    truth = planted_regions(aal3, SIM, seed=2)
    assert read_planted(cohort, aal3) == {"fc_index": truth["fc_index"],
                                          "ts_index": truth["ts_index"]}
    assert read_planted(no_truth, aal3) is None
    from fmmtc_core.atlas import load_atlas

    assert read_planted(cohort, load_atlas("hcpex")) is None  # simulated in another atlas


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------
def test_cpm_and_nbs_select_the_planted_edges():
    feats, y, planted = _synthetic(n=60)
    cpm = CPMClassifier(p_threshold=0.001).fit(feats.edges, y)
    assert set(planted) <= set(np.flatnonzero(cpm.positive_))
    nbs = NBSPredictClassifier(p_threshold=0.001).fit(feats.edges, y)
    assert set(planted) <= set(nbs.selected_) and nbs.n_supra_ >= planted.size
    fresh, y_new, _ = _synthetic(n=60, seed=1)
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(y_new, cpm.decision_function(fresh.edges)) > 0.9
    assert roc_auc_score(y_new, nbs.decision_function(fresh.edges)) > 0.9


def test_nbs_without_supra_threshold_edges_predicts_logit_zero():
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((20, 45)), np.arange(20) % 2
    nbs = NBSPredictClassifier(p_threshold=1e-12).fit(X, y)
    assert nbs.selected_.size == 0
    np.testing.assert_array_equal(nbs.decision_function(X), 0.0)


def test_estimator_errors():
    with pytest.raises(InvalidInputError, match="not fitted yet"):
        CPMClassifier().decision_function(np.zeros((2, 3)))
    with pytest.raises(InvalidInputError, match="not the upper triangle"):
        NBSPredictClassifier().fit(np.zeros((4, 7)), [0, 1, 0, 1])
    with pytest.raises(InvalidInputError, match="both classes"):
        CPMClassifier().fit(np.zeros((4, 6)), [1, 1, 1, 1])


# --------------------------------------------------------------------------------------------
# Protocol: same folds, nothing from the test fold
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BASELINES)
def test_test_fold_labels_do_not_reach_the_fold_model(name):
    feats, y, _ = _synthetic()
    splits, _ = _splits(y, None, 3, 0)
    test0 = splits[0][1]
    before = cross_validate(name, feats, y, splits, inner_folds=3)
    y_shuffled = y.copy()
    y_shuffled[test0] = 1 - y[test0]  # every test label of fold 0 flipped
    after = cross_validate(name, feats, y_shuffled, splits, inner_folds=3)
    np.testing.assert_array_equal(before.logit[test0], after.logit[test0])
    assert before.chosen[0] == after.chosen[0]  # the inner CV chose the same
    assert (before.fold == after.fold).all()


def test_calibration_of_a_fold_ignores_its_own_labels():
    rng = np.random.default_rng(0)
    y = np.arange(30) % 2
    logit = y + rng.standard_normal(30)
    fold = np.arange(30) % 3
    y2 = y.copy()
    y2[fold == 0] = 1 - y2[fold == 0]
    a, b = cross_fitted_platt(logit, y, fold), cross_fitted_platt(logit, y2, fold)
    np.testing.assert_array_equal(a[fold == 0], b[fold == 0])


def test_compare_uses_the_training_folds_and_seeds(cohort, subjects):
    table = compare(cohort, folds=3, seed=1, repeats=2, models=("cpm", "oracle"),
                    subjects=subjects, atlas="aal3", inner_folds=2, n_bootstrap=200)
    assert list(table["model"]) == ["cpm", "oracle"]
    y, groups = _labels(cohort)
    preds = table.attrs["predictions"]
    for r in (0, 1):
        splits, how = _splits(y, groups, 3, 1 + r)
        expected = np.zeros(len(y), dtype=int)
        for k, (_, test) in enumerate(splits):
            expected[test] = k
        for name in ("cpm", "oracle"):
            got = preds[(preds["model"] == name) & (preds["repeat"] == r)]
            np.testing.assert_array_equal(got["fold"].to_numpy(), expected)
    assert table.attrs["protocol"]["seeds"] == [1, 2]
    assert table.attrs["protocol"]["split"] == "stratified, grouped by site"
    assert table["repeats"].eq(2).all() and table["auc_sd"].notna().all()
    assert (table["auc_low"] <= table["auc"]).all() and (table["auc"] <= table["auc_high"]).all()


def test_oracle_beats_chance_and_needs_planted_truth(cohort, no_truth, subjects):
    table = compare(cohort, folds=3, models=("oracle",), subjects=subjects, atlas="aal3",
                    n_bootstrap=200)
    oracle = table.set_index("model").loc["oracle"]
    assert oracle["auc"] > 0.8 and oracle["auc_low"] > 0.5
    assert "planted" in oracle["note"]
    table = compare(no_truth, folds=3, models=("oracle", "cpm"), subjects=subjects,
                    atlas="aal3", inner_folds=2, n_bootstrap=200)
    assert list(table["model"]) == ["cpm"]
    assert "no planted truth" in table.attrs["skipped"]["oracle"]
    with pytest.raises(InvalidInputError, match="Nothing to compare: oracle: no planted truth"):
        compare(no_truth, folds=3, models=("oracle",), subjects=subjects, atlas="aal3")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"models": ("cpm", "svm")}, "Invalid value for the 'models' parameter"),
    ({"models": ""}, "No model to compare"),
    ({"folds": 1}, "folds must be a whole number of at least 2"),
    ({"repeats": 0}, "repeats must be a whole number of at least 1"),
    ({"folds": 13}, "13-fold cross-validation needs at least 13 participants of each class"),
])
def test_compare_refuses_bad_arguments(cohort, subjects, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        compare(cohort, subjects=subjects, atlas="aal3", **kwargs)


def test_verdict_says_plainly_when_fmmtc_is_not_better(cohort, subjects, monkeypatch):
    def no_signal(cohort_dir, subjects, y, fold, **kwargs):
        return np.random.default_rng(0).standard_normal(len(y))

    monkeypatch.setattr("fmmtc_core.baselines._fmmtc_oof", no_signal)
    table = compare(cohort, folds=3, models=("cpm", "oracle", "fmmtc"), subjects=subjects,
                    atlas="aal3", inner_folds=2, n_bootstrap=200)
    # The oracle is a reference, not a competitor: the best classic baseline is cpm.
    assert table.attrs["verdict"].startswith(
        "FMM-TC is NOT better than the best classic baseline (cpm)")
    assert table.attrs["fmmtc_vs_best"]["best"] == "cpm"
    assert table.attrs["fmmtc_vs_best"]["difference"] < 0
    assert "NO RELIABLE SIGNAL" in table.set_index("model").loc["fmmtc", "warnings"]


def test_auc_intervals():
    y = np.array([0, 0, 0, 1, 1, 1])
    assert repeated_auc_interval(y, y.astype(float), n_boot=200) == (1.0, 1.0)
    scores = np.stack([y + 0.1 * np.arange(6), y - 0.1 * np.arange(6)])
    low, high = repeated_auc_interval(y, scores, n_boot=200)
    assert 0.5 < low <= high <= 1.0
    same = paired_auc_difference(y, scores, scores, n_boot=200)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def test_cli_prints_one_aligned_table(cohort, cached, tmp_path, capsys):
    out = tmp_path / "t" / "table.tsv"
    code = main(["compare", str(cohort), "--atlas", "aal3", "--folds", "3",
                 "--models", "cpm,oracle", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0 and stderr == ""
    lines = stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("model "))
    assert lines[header].split()[:3] == ["model", "AUC", "95%"]
    rows = lines[header + 1 : header + 3]
    assert [r.split()[0] for r in rows] == ["cpm", "oracle"]
    assert len({r.index("[") for r in rows}) == 1  # aligned columns
    assert "FMM-TC was not run" in stdout
    written = pd.read_csv(out, sep="\t")
    assert list(written["model"]) == ["cpm", "oracle"]

    code = main(["compare", str(cohort), "--atlas", "aal3", "--folds", "3", "--models",
                 "oracle", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and [m["model"] for m in doc["models"]] == ["oracle"]
    assert doc["models"][0]["auc_sd"] is None and doc["protocol"]["folds"] == 3


@pytest.mark.parametrize(("argv", "match"), [
    (["--models", "cpm,svm"], "argument --models: expected comma-separated names"),
    (["--folds", "1"], "argument --folds: must be at least 2"),
    (["--repeats", "0"], "argument --repeats: must be at least 1"),
    (["--out", "table.csv"], "--out must name a .tsv file"),
    (["--foundation", "x"], "--foundation is used only by the fmmtc model"),
    (["--models", "fmmtc", "--foundation", "nowhere"], "is not a foundation encoder folder"),
])
def test_cli_refuses_bad_arguments(cohort, capsys, argv, match):
    try:
        code = main(["compare", str(cohort), *argv])
    except SystemExit as exc:  # the parser's refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0]


def test_cli_refusals_do_not_import_torch(tmp_path):
    script = (
        "import sys\n"
        "from fmmtc_core.cli import main\n"
        f"assert main(['compare', {str(tmp_path)!r}]) == 2\n"
        f"assert main(['compare', {str(tmp_path)!r}, '--out', 'x.csv']) == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "has no participants.tsv" in proc.stderr


@pytest.mark.slow
def test_compare_with_fmmtc_trains_on_the_same_folds(cohort, subjects):
    table = compare(cohort, folds=3, models=("cpm", "fmmtc"), subjects=subjects, atlas="aal3",
                    fmmtc_options={"modalities": "fc", "epochs": 3}, n_bootstrap=200)
    assert list(table["model"]) == ["cpm", "fmmtc"]
    assert "FMM-TC" in table.attrs["verdict"] and "best classic baseline (cpm)" in \
        table.attrs["verdict"]
    preds = table.attrs["predictions"]
    folds = {m: preds.loc[preds["model"] == m, "fold"].to_numpy() for m in ("cpm", "fmmtc")}
    np.testing.assert_array_equal(folds["cpm"], folds["fmmtc"])
