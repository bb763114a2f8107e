"""Classic baselines as deployable model folders (`fmmtc train --model`): what is stored
reproduces the fitted estimators, screening a participant gives the in-memory ensemble's
probability, explanations are exact, the card says what was trained, and bad input is refused
without leaving a folder behind."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from fmmtc_core import InvalidInputError
from fmmtc_core._errors import ModelFileError
from fmmtc_core.atlas import Atlas
from fmmtc_core.baselines import (
    DEPLOYABLE,
    BaselineFeatures,
    baseline_features,
    compare,
    cross_validate,
    fit_fold,
    train_baseline,
)
from fmmtc_core.bids import read_cohort
from fmmtc_core.cli import main
from fmmtc_core.models.classic import ClassicModel, LinearFold, _linear, fold_arrays
from fmmtc_core.models.deployed import MODEL_TYPES, ScreeningModel
from fmmtc_core.models.ensemble import FMMTCEnsemble, load_model, platt
from fmmtc_core.pipeline import prepare_cohort
from fmmtc_core.simulate import SimulationConfig, write_cohort
from fmmtc_core.training import TrainingWarning, _splits

# The cohort of test_baselines: 24 participants, 4 sites, clear planted effects.
SIM = SimulationConfig(n_volumes=100, fc_effect=0.6, ts_effect=0.6, n_sites=4)
FOLDS, INNER = 3, 2
FOLDER_FILES = {"fold_0.safetensors", "fold_1.safetensors", "fold_2.safetensors",
                "baseline.safetensors", "model_card.json", "metrics.json",
                "oof_predictions.tsv"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("classic") / "cohort", 24, seed=2,
                        fmt="timeseries", atlas="aal3", config=SIM)


@pytest.fixture(scope="module")
def subjects(cohort):
    return prepare_cohort(read_cohort(cohort), "aal3")


@pytest.fixture(scope="module")
def feats(subjects):
    return baseline_features(subjects)


@pytest.fixture(scope="module")
def labels(cohort):
    parts = read_cohort(cohort).participants
    return parts["responder"].to_numpy().astype(int), parts["site"].astype(str).to_numpy()


def fewer_resamples(mp: pytest.MonkeyPatch) -> None:
    """Cut the bootstraps of the card's AUC interval (1000) and calibration band (200) to a
    tenth: most of a tiny cohort's training time, and tested in test_evaluation."""
    from functools import partial

    import fmmtc_core.evaluation as ev

    mp.setattr(ev, "auc_interval", partial(ev.auc_interval, n=100))
    mp.setattr(ev, "platt_bootstrap", partial(ev.platt_bootstrap, n=20))


@pytest.fixture(scope="module")
def trained(cohort, subjects, tmp_path_factory):
    """Each baseline trained once into a folder (on first use), shared by the module."""
    root = tmp_path_factory.mktemp("folders")
    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
                warnings.simplefilter("ignore", TrainingWarning)
                fewer_resamples(mp)
                train_baseline(cohort, root / kind, model=kind, folds=FOLDS, atlas="aal3",
                               subjects=subjects, inner_folds=INNER)
            done[kind] = root / kind
        return done[kind]

    return get


@pytest.fixture
def cached(monkeypatch, subjects):
    """Training and evaluation take the prepared signals instead of cleaning again (and
    fewer bootstrap resamples)."""
    fake = lambda cohort, atlas, progress=None, cleaning=None: subjects  # noqa: E731
    monkeypatch.setattr("fmmtc_core.pipeline.prepare_cohort", fake)
    monkeypatch.setattr("fmmtc_core.training.prepare_cohort", fake)
    fewer_resamples(monkeypatch)


def _in_memory(kind, feats, labels):
    """The fold models fitted in memory, on the folds and seeds training uses."""
    y, groups = labels
    splits, _ = _splits(y, groups, FOLDS, 0)
    return cross_validate(kind, feats, y, splits, inner_folds=INNER, seed=0,
                          keep_models=True).models


def _scan(cohort, i=0):
    """Participant i's scan and confounds, as training read them."""
    row = read_cohort(cohort).participants.iloc[i]
    return row["scan"], row["confounds"]


# --------------------------------------------------------------------------------------------
# Stored parameters reproduce the fitted estimators (no cohort needed)
# --------------------------------------------------------------------------------------------
def _synthetic(n=36, n_regions=10, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    iu = np.triu_indices(n_regions, 1)
    edges = rng.normal(0.3, 0.1, (n, iu[0].size)).astype(np.float32)
    edges[:, (iu[0] < 4) & (iu[1] < 4)] += 0.15 * y[:, None]
    amplitude = rng.standard_normal((n, 4 * n_regions))
    amplitude[:, 0] += y
    amplitude[rng.random(amplitude.shape) < 0.05] = np.nan  # regions without signal
    amplitude[:, 7] = np.nan  # a feature with no value at all: dropped by the imputer
    return BaselineFeatures(edges=edges, amplitude=amplitude,
                            amplitude_names=[f"f{i}" for i in range(4 * n_regions)],
                            n_regions=n_regions), y


@pytest.mark.filterwarnings("ignore:Skipping features without any observed values")
@pytest.mark.parametrize("kind", DEPLOYABLE)
def test_stored_parameters_give_the_estimators_logits(kind):
    feats, y = _synthetic()
    X = feats.matrix(kind)
    train = np.arange(24)
    model, _ = fit_fold(kind, X, y, train, inner_folds=3)
    fold = _linear(kind, fold_arrays(kind, model, X.shape[1]))
    fresh, _ = _synthetic(seed=1)
    Xf = fresh.matrix(kind)
    # float32 edges go through scikit-learn in float32; the folder computes in float64
    np.testing.assert_allclose(fold.logit(Xf), model.decision_function(Xf), rtol=1e-5,
                               atol=1e-5)


def test_the_deployable_types_are_fmmtc_and_the_baselines_but_the_oracle():
    assert MODEL_TYPES == ("fmmtc", *DEPLOYABLE) and "oracle" not in MODEL_TYPES


def test_nbs_without_an_edge_is_stored_as_logit_zero():
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((20, 45)), np.arange(20) % 2
    from fmmtc_core.baselines import NBSPredictClassifier

    nbs = NBSPredictClassifier(p_threshold=1e-12).fit(X, y)
    arrays = fold_arrays("nbs", nbs, 45)
    assert not arrays["selected"].any() and arrays["coef"].shape == (0,)
    np.testing.assert_array_equal(_linear("nbs", arrays).logit(X), 0.0)


# --------------------------------------------------------------------------------------------
# Exact explanations (a hand-built model: attributions worked out by hand)
# --------------------------------------------------------------------------------------------
R = 4


@pytest.fixture(scope="module")
def toy_atlas():
    img = nib.Nifti1Image(np.arange(1, R + 1, dtype=np.int16).reshape(1, 2, 2), np.eye(4))
    return Atlas(name="toy", labels_img=img, labels=np.arange(1, R + 1) * 10,
                 names=tuple(f"region{i}" for i in range(R)), centroids_mm=np.zeros((R, 3)),
                 hemispheres=("L",) * R, groups=("A", "A", "B", "B"), volumes_mm3=np.ones(R))


def _toy(kind, n_features, seed=0):
    rng = np.random.default_rng(seed)
    folds = [LinearFold(rng.standard_normal(n_features), float(rng.standard_normal()),
                        rng.standard_normal(n_features) if kind == "amplitude" else None)
             for _ in range(3)]
    card = {"name": "toy", "calibration": {"a": 1.0, "b": 0.0}}
    return ClassicModel(kind=kind, models=folds, card=card,
                        feature_mean=rng.standard_normal(n_features), n_regions=R)


def test_edge_attributions_are_weight_times_distance_shared_by_both_ends(toy_atlas):
    model = _toy("cpm", R * (R - 1) // 2)
    rng = np.random.default_rng(1)
    c = rng.standard_normal((R, R)).astype(np.float32)
    fc = (c + c.T) / 2
    e = model.explain(fc, atlas=toy_atlas)
    iu = np.triu_indices(R, 1)
    x = fc[iu].astype(np.float64)
    by_hand = np.mean([m.weights for m in model.models], axis=0) * (x - model.feature_mean)
    np.testing.assert_allclose((e.fc + e.fc.T)[iu], by_hand, rtol=1e-12)
    np.testing.assert_allclose(e.fc, e.fc.T)
    # each region gets half of each of its edges
    half = np.zeros(R)
    for k, (i, j) in enumerate(zip(*iu)):
        half[i] += by_hand[k] / 2
        half[j] += by_hand[k] / 2
    np.testing.assert_allclose(e.region_fc, half, rtol=1e-12)
    np.testing.assert_array_equal(e.region_ts, 0.0)
    # completeness: the attributions add up to F(x) - F(baseline)
    assert e.region_total.sum() == pytest.approx(e.logit - e.baseline_logit, abs=1e-12)
    assert e.ig_gap_abs < 1e-12 and e.steps == 0 and e.ts is None
    assert e.logit == pytest.approx(float(model.fold_logits(x[None]).mean()), abs=1e-12)
    assert e.modality_share == {"ts": 0.0, "fc": 1.0}
    assert e.baseline == {"fc": "cohort_mean"}
    assert e.settings["method"] == "exact_linear_attribution"
    assert e.to_dict()["method"] == "exact_linear_attribution"
    assert abs(e.top_connections[0]["score"]) == pytest.approx(np.abs(by_hand).max())
    zero = model.explain(fc, baseline="zero", atlas=toy_atlas)
    assert zero.baseline == {"fc": "zero"}
    assert zero.baseline_logit == pytest.approx(np.mean([m.intercept for m in model.models]))


def test_amplitude_attributions_are_the_regions_own_features_counted_as_time_series(
        toy_atlas):
    model = _toy("amplitude", 4 * R)
    x = np.random.default_rng(2).standard_normal(4 * R)
    x[5] = np.nan  # a region without signal: each fold imputes its own value
    e = model.explain(None, x, atlas=toy_atlas)
    by_hand = np.mean([m.weights * (np.where(np.isnan(x), m.impute, x) - model.feature_mean)
                       for m in model.models], axis=0)
    np.testing.assert_allclose(e.amplitude, by_hand.reshape(4, R).sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(e.region_ts, e.amplitude)
    assert e.fc is None and e.top_connections == []
    assert e.region_total.sum() == pytest.approx(e.logit - e.baseline_logit, abs=1e-12)
    assert e.modality_share == {"ts": 1.0, "fc": 0.0}
    assert e.baseline == {"amplitude": "cohort_mean"}
    totals = e.settings["feature_totals"]
    assert list(totals) == ["log_sd", "log_alff", "falff", "ac1"]
    assert sum(totals.values()) == pytest.approx(e.region_total.sum())


def test_explanation_refusals(toy_atlas):
    model = _toy("edges", R * (R - 1) // 2)
    fc = np.eye(R, dtype=np.float32)
    with pytest.raises(InvalidInputError, match="reads the connectivity"):
        model.explain(None, atlas=toy_atlas)
    with pytest.raises(InvalidInputError, match=r"fc must have shape \(B, 4, 4\)"):
        model.explain(np.eye(3), atlas=toy_atlas)
    with pytest.raises(InvalidInputError, match="Invalid value for the 'baseline_fc'"):
        model.explain(fc, baseline="flat", atlas=toy_atlas)
    with pytest.raises(InvalidInputError, match=r"baseline_fc has shape \(2, 2\)"):
        model.explain(fc, baseline=np.eye(2), atlas=toy_atlas)
    with pytest.raises(InvalidInputError, match="reads the amplitude features"):
        _toy("amplitude", 4 * R).explain(fc, atlas=toy_atlas)


# --------------------------------------------------------------------------------------------
# Trained folders: screening, explanation, card, the protocol of `fmmtc compare`
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", DEPLOYABLE)
def test_screening_gives_the_in_memory_ensemble_probability(kind, trained, cohort, subjects,
                                                            feats, labels):
    from fmmtc_core.screening import analyse

    model = load_model(trained(kind))
    assert isinstance(model, ClassicModel) and isinstance(model, ScreeningModel)
    assert model.model_type == kind and len(model.models) == FOLDS
    scan, confounds = _scan(cohort)
    a = analyse(scan, model, confounds=confounds)
    # the features screening computed are training's, bit for bit
    X = feats.matrix(kind)
    got = model.features(a.fc, a.amplitude)
    np.testing.assert_array_equal(got[0], X[0])
    # ... and the folder's ensemble is the fold models fitted in memory
    fitted = _in_memory(kind, feats, labels)
    logit = np.mean([m.decision_function(X[:1])[0] for m in fitted])
    cal = model.card["calibration"]
    assert a.probability == pytest.approx(float(platt(logit, cal["a"], cal["b"])), abs=1e-6)
    assert a.band[0] <= a.probability <= a.band[1]
    assert a.fold_probabilities == pytest.approx(
        list(platt([m.decision_function(X[:1])[0] for m in fitted], cal["a"], cal["b"])),
        abs=1e-6)
    # its explanation is exact and explains that same logit
    e = a.explanation
    assert e.logit == pytest.approx(logit, abs=1e-5)
    assert e.region_total.sum() == pytest.approx(e.logit - e.baseline_logit, abs=1e-9)
    assert e.settings["method"] == "exact_linear_attribution" and e.steps == 0
    share = {"ts": 1.0, "fc": 0.0} if kind == "amplitude" else {"ts": 0.0, "fc": 1.0}
    assert e.modality_share == share


@pytest.mark.parametrize("kind", DEPLOYABLE)
def test_out_of_fold_logits_and_auc_are_those_of_compare(kind, trained, cohort, subjects):
    folder = trained(kind)
    table = compare(cohort, folds=FOLDS, models=(kind,), subjects=subjects, atlas="aal3",
                    inner_folds=INNER, n_bootstrap=200)
    oof = pd.read_csv(folder / "oof_predictions.tsv", sep="\t", dtype={"participant_id": str})
    preds = table.attrs["predictions"]
    np.testing.assert_array_equal(oof["fold"].to_numpy(), preds["fold"].to_numpy())
    np.testing.assert_allclose(oof["logit"].to_numpy(), preds["logit"].to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(oof["probability"].to_numpy(), preds["probability"].to_numpy())
    card = json.loads((folder / "model_card.json").read_text())
    assert card["metrics_out_of_fold"]["auc"] == pytest.approx(float(table["auc"].iloc[0]))


def test_repeats_join_the_ensemble_and_permutations_are_carded(cohort, subjects, labels,
                                                               tmp_path):
    out = tmp_path / "cpm"
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as mp:
        warnings.simplefilter("ignore", TrainingWarning)
        fewer_resamples(mp)
        metrics = train_baseline(cohort, out, model="cpm", folds=FOLDS, repeats=2,
                                 permutations=2, atlas="aal3", subjects=subjects,
                                 inner_folds=INNER)
    model = load_model(out)
    assert len(model.models) == 2 * FOLDS  # every fold of every repeat
    card = json.loads((out / "model_card.json").read_text())
    assert [(f["repeat"], f["fold"]) for f in card["training"]["per_fold"]] == [
        (r, k) for r in range(2) for k in range(FOLDS)]
    assert len(metrics["auc_per_repeat"]) == 2 and metrics["repeats"] == 2
    assert metrics["permutation"]["n_permutations"] == 2
    # a participant's out-of-fold logit is the mean over repeats, as compare() runs them
    table = compare(cohort, folds=FOLDS, repeats=2, models=("cpm",), subjects=subjects,
                    atlas="aal3", inner_folds=INNER, n_bootstrap=200)
    preds = table.attrs["predictions"]
    per_repeat = [preds.loc[preds["repeat"] == r, "logit"].to_numpy() for r in range(2)]
    oof = pd.read_csv(out / "oof_predictions.tsv", sep="\t")
    np.testing.assert_allclose(oof["logit"].to_numpy(), np.mean(per_repeat, axis=0),
                               rtol=1e-12)
    from sklearn.metrics import roc_auc_score

    assert metrics["auc_per_repeat"] == pytest.approx(
        [roc_auc_score(labels[0], logit) for logit in per_repeat])


@pytest.mark.parametrize("kind", DEPLOYABLE)
def test_card_says_what_was_trained(kind, trained, labels):
    folder = trained(kind)
    assert {p.name for p in folder.iterdir()} == FOLDER_FILES
    card = json.loads((folder / "model_card.json").read_text())
    spec = card["model"]
    assert spec["type"] == kind and spec["classic_baseline"] is True
    r = spec["n_regions"]
    assert r == 166
    if kind == "amplitude":
        assert spec["features"]["kind"] == "region amplitude" and spec["n_features"] == 4 * r
        assert spec["features"]["alff_band_hz"] == [0.01, 0.08]
    else:
        assert spec["features"]["kind"] == "connectivity edges"
        assert spec["n_features"] == r * (r - 1) // 2
        assert spec["features"]["span"] == "the whole cleaned series (every volume)"
    per_fold = card["training"]["per_fold"]
    assert [f["fold"] for f in per_fold] == [0, 1, 2]
    key = "p_threshold" if kind in ("cpm", "nbs") else "c_per_feature"
    assert all(key in f and "inner_auc" in f for f in per_fold)
    assert card["training"]["split"] == _splits(*labels, FOLDS, 0)[1]
    for section in ("a", "b", "bootstrap", "band", "note"):
        assert section in card["calibration"]
    for key in ("auc", "auc_ci95", "brier", "ece", "warnings", "calibration"):
        assert key in card["metrics_out_of_fold"]
    assert card["warnings"] == card["metrics_out_of_fold"]["warnings"]
    assert json.loads((folder / "metrics.json").read_text()) == card["metrics_out_of_fold"]
    assert set(card["files"]) == {n for n in FOLDER_FILES if n.endswith(".safetensors")}
    for rel, digest in card["files"].items():
        assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == digest


def test_evaluate_scores_a_baseline_folder(trained, cohort, cached, feats, labels):
    from fmmtc_core.training import evaluate

    model = load_model(trained("amplitude"))
    metrics = evaluate(trained("amplitude"), cohort)
    y, _ = labels
    expected = model.predict_proba(None, None, feats.amplitude)["probability"]
    from fmmtc_core.training import binary_metrics

    assert metrics == pytest.approx(binary_metrics(y, expected))


def test_the_version_id_follows_the_files(trained, tmp_path):
    folder = Path(shutil.copytree(trained("cpm"), tmp_path / "cpm"))
    first = load_model(folder).weights_sha256
    assert load_model(folder).weights_sha256 == first
    card = json.loads((folder / "model_card.json").read_text())
    card["name"] = "renamed"
    (folder / "model_card.json").write_text(json.dumps(card))
    assert load_model(folder).weights_sha256 != first


# --------------------------------------------------------------------------------------------
# Bad input: clear refusals, no folder left behind
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "match"), [
    ("oracle", "The oracle cannot be trained into a model folder: it reads the planted truth"),
    ("svm", "Invalid value for the 'model' parameter. Allowed values are 'cpm', 'nbs', "
            "'edges' and 'amplitude', but got 'svm' instead"),
    ("fmmtc", "Invalid value for the 'model' parameter"),
])
def test_train_baseline_refuses_what_it_cannot_deploy(cohort, tmp_path, model, match):
    with pytest.raises(InvalidInputError, match=match):
        train_baseline(cohort, tmp_path / "m", model=model, atlas="aal3")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"folds": 1}, "folds must be a whole number of at least 2"),
    ({"repeats": 0}, "repeats must be a whole number of at least 1"),
    ({"permutations": -1}, "permutations must be a whole number of at least 0"),
    ({"folds": 13}, "13-fold cross-validation needs at least 13 participants of each class"),
])
def test_train_baseline_refuses_bad_options_before_any_work(cohort, tmp_path, kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        train_baseline(cohort, tmp_path / "m", model="cpm", atlas="aal3", **kwargs)
    assert not (tmp_path / "m").exists()


def _folder_parts(folder):
    """What write_classic_folder was given for ``folder``: fold arrays, mean, card."""
    from safetensors.numpy import load_file

    folds = [load_file(str(folder / f"fold_{k}.safetensors")) for k in range(FOLDS)]
    mean = load_file(str(folder / "baseline.safetensors"))["feature_mean"]
    card = json.loads((folder / "model_card.json").read_text())
    return folds, mean, {k: v for k, v in card.items() if k != "files"}


def test_a_failure_while_writing_leaves_no_folder(trained, tmp_path, monkeypatch):
    import safetensors.numpy

    from fmmtc_core.models.classic import write_classic_folder

    folds, mean, card = _folder_parts(trained("cpm"))
    real, calls = safetensors.numpy.save_file, []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata)

    monkeypatch.setattr(safetensors.numpy, "save_file", failing)
    out = tmp_path / "models" / "m"
    with pytest.raises(OSError, match="No space left"):
        write_classic_folder(out, folds=folds, feature_mean=mean, card=card,
                             extras={"metrics.json": "{}"})
    assert list((tmp_path / "models").iterdir()) == []  # no folder, no staging copy
    # an existing model folder stays as it was
    shutil.copytree(trained("cpm"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls.clear()
    with pytest.raises(OSError, match="No space left"):
        write_classic_folder(out, folds=folds, feature_mean=mean, card=card)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["m"]


def test_writing_over_an_fmmtc_folder_replaces_its_model_files(trained, tmp_path):
    from fmmtc_core.models.classic import write_classic_folder

    out = tmp_path / "m"
    (out / "foundation").mkdir(parents=True)
    (out / "foundation" / "config.json").write_text("{}")
    for name in ("fold_7.safetensors", "fold_0.safetensors", "model_card.json"):
        (out / name).write_bytes(b"old")
    (out / "comparison.tsv").write_text("model\tauc\n")
    folds, mean, card = _folder_parts(trained("nbs"))
    write_classic_folder(out, folds=folds, feature_mean=mean, card=card,
                         extras={"metrics.json": "{}", "oof_predictions.tsv": ""})
    assert {p.name for p in out.iterdir()} == FOLDER_FILES | {"comparison.tsv"}
    assert load_model(out).model_type == "nbs"
    with pytest.raises(InvalidInputError, match="exists and is not a folder"):
        write_classic_folder(out / "comparison.tsv", folds=folds, feature_mean=mean, card=card)


@pytest.fixture
def folder(trained, tmp_path):
    """A fresh copy of the trained cpm folder, free to damage."""
    return Path(shutil.copytree(trained("cpm"), tmp_path / "cpm"))


@pytest.mark.parametrize("rel", ["fold_1.safetensors", "baseline.safetensors"])
def test_a_tampered_baseline_folder_is_refused(folder, rel):
    data = bytearray((folder / rel).read_bytes())
    data[-1] ^= 0xFF
    (folder / rel).write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=rf"Model file '{rel}' in .* does not match its "
                                             r"card \(SHA-256"):
        load_model(folder)


def _edit_card(folder, edit) -> None:
    card = json.loads((folder / "model_card.json").read_text())
    edit(card)
    (folder / "model_card.json").write_text(json.dumps(card))


def test_a_fold_file_of_another_baseline_is_refused(folder, trained):
    shutil.copy(trained("edges") / "fold_0.safetensors", folder / "fold_0.safetensors")
    digest = hashlib.sha256((folder / "fold_0.safetensors").read_bytes()).hexdigest()
    _edit_card(folder, lambda c: c["files"].__setitem__("fold_0.safetensors", digest))
    with pytest.raises(ModelFileError, match=r"'fold_0.safetensors' .* does not hold a cpm fold "
                                             r"model: missing negative, positive"):
        load_model(folder)


@pytest.mark.parametrize(("change", "match"), [
    ({"coef": np.zeros(2)}, r"coef has shape \(2,\) and type float64; expected \(3,\) float64"),
    ({"selected": np.ones(10)}, r"selected has shape \(10,\) and type float64; expected "
                                r"\(10,\) bool"),
    ({"scaler_scale": np.array([1.0, 0.0, 1.0])}, "scaler_scale holds values <= 0"),
    ({"intercept": np.array([np.nan])}, "intercept holds non-finite values"),
])
def test_fold_arrays_that_do_not_fit_are_refused(change, match):
    from fmmtc_core.models.classic import _check_fold

    selected = np.zeros(10, bool)
    selected[[1, 4, 7]] = True
    arrays = {"selected": selected, "scaler_mean": np.zeros(3), "scaler_scale": np.ones(3),
              "coef": np.ones(3), "intercept": np.zeros(1)}
    _check_fold("nbs", arrays, 10, "fold_0")  # as written: accepted
    with pytest.raises(ModelFileError, match=match):
        _check_fold("nbs", arrays | change, 10, "fold_0")


@pytest.mark.parametrize(("edit", "match"), [
    (lambda c: c["model"].__setitem__("type", "oracle"), "has the model type 'oracle'; expected "
                                                         "one of 'fmmtc', 'cpm'"),
    (lambda c: c["model"].__setitem__("n_features", 3),
     "a cpm model on 166 regions reads 13695 features, but the card gives n_features 3"),
    (lambda c: c["model"].__setitem__("n_regions", "many"), "no usable model 'n_regions'"),
])
def test_a_card_that_does_not_describe_the_baseline_is_refused(folder, edit, match):
    _edit_card(folder, edit)
    with pytest.raises(ModelFileError, match=match):
        load_model(folder)


# --------------------------------------------------------------------------------------------
# Old folders are FMM-TC, unchanged
# --------------------------------------------------------------------------------------------
def test_the_bundled_demo_and_untyped_old_cards_load_as_fmmtc(monkeypatch, tmp_path):
    from fmmtc_core.config import DEMO_MODEL_DIR

    monkeypatch.delenv("FMMTC_MODEL_DIR", raising=False)
    card = json.loads((DEMO_MODEL_DIR / "model_card.json").read_text())
    assert card["model"]["type"] == "fmmtc"  # as fmmtc train writes it now
    demo = load_model(device="cpu")  # checks every file against the card's digests
    assert isinstance(demo, FMMTCEnsemble) and isinstance(demo, ScreeningModel)
    assert demo.model_type == "fmmtc"
    # a card written before baselines were deployable names no type: FMM-TC, unchanged
    copy = Path(shutil.copytree(DEMO_MODEL_DIR, tmp_path / "demo"))
    _edit_card(copy, lambda c: c["model"].pop("type"))
    untyped = load_model(copy, device="cpu")
    assert isinstance(untyped, FMMTCEnsemble) and untyped.model_type == "fmmtc"
    assert len(untyped.models) == len(demo.models)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_trains_screens_and_explains_with_a_baseline(cohort, cached, tmp_path, capsys):
    out = tmp_path / "amp"
    code, stdout, err = _run(["train", cohort, "--out", out, "--model", "amplitude", "--atlas",
                              "aal3", "--folds", FOLDS], capsys)
    assert code == 0, err
    assert "trained model type amplitude: the classic baseline amplitude (not the deep model)" \
        in stdout
    assert load_model(out).model_type == "amplitude"
    scan, confounds = _scan(cohort)
    code, stdout, err = _run(["explain", scan, "--model", out, "--json"], capsys)
    assert code == 0, err
    d = json.loads(stdout)
    assert d["method"] == "exact_linear_attribution" and d["steps"] == 0
    assert d["modality_share"] == {"ts": 1.0, "fc": 0.0}
    code, stdout, err = _run(["explain", scan, "--model", out, "--top", "2"], capsys)
    assert code == 0 and "exact linear attribution (classic baseline amplitude)" in stdout
    db = tmp_path / "c.db"
    code, stdout, err = _run(["screen", scan, "--confounds", confounds, "--model", out,
                              "--db", f"sqlite:///{db}", "--json"], capsys)
    assert code == 0, err
    s = json.loads(stdout)
    assert s["method"] == "exact_linear_attribution" and 0 <= s["probability"] <= 1
    code, stdout, err = _run(["screen", scan, "--confounds", confounds, "--model", out,
                              "--db", f"sqlite:///{db}", "--json"], capsys)
    again = json.loads(stdout)  # the stored screening, read back: the method was kept
    assert code == 0 and again["reused"] and again["method"] == "exact_linear_attribution"
    assert again["probability"] == pytest.approx(s["probability"])
    code, stdout, err = _run(["evaluate", out, cohort, "--json"], capsys)
    assert code == 0 and json.loads(stdout)["n_subjects"] == 24


@pytest.mark.parametrize(("argv", "match"), [
    (["--model", "oracle"], "argument --model: the oracle cannot be trained into a model "
                            "folder"),
    (["--model", "svm"], "argument --model: expected one of fmmtc, cpm, nbs, edges, amplitude; "
                         "got 'svm'"),
    (["--model", "cpm", "--foundation", "x", "--preset", "small"],
     "--foundation, --preset do not apply to --model cpm, a classic baseline"),
    (["--model", "edges", "--epochs", "3"], "--epochs does not apply to --model edges"),
    (["--model", "nbs", "--no-foundation"], "--no-foundation does not apply to --model nbs"),
])
def test_cli_refuses_options_that_do_not_apply(tmp_path, capsys, argv, match):
    try:
        code = main(["train", str(tmp_path), "--out", str(tmp_path / "m"), *argv])
    except SystemExit as exc:  # the parser's refusals
        code = exc.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert match in lines[0]
    assert not (tmp_path / "m").exists()


def test_cli_refusals_do_not_import_torch(tmp_path):
    script = (
        "import sys\n"
        "from fmmtc_core.cli import main\n"
        f"assert main(['train', {str(tmp_path)!r}, '--out', 'x', '--model', 'cpm', "
        "'--preset', 'paper']) == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--preset does not apply to --model cpm" in proc.stderr
