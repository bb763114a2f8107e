"""Model folders as files: tamper evidence (SHA-256 against the card) and clear refusals of
files that are not what they claim to be. Nothing in a model folder is ever unpickled."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fmmtc_core._errors import ModelFileError
from fmmtc_core.models.foundation import BrainLMConfig, load_foundation
from fmmtc_core.simulate import SimulationConfig, write_cohort
from fmmtc_core.models.ensemble import default_model_dir, load_model
from fmmtc_core.pretraining import pretrain
from fmmtc_core.training import train

MODEL_FILES = {"fold_0.safetensors", "fold_1.safetensors", "baseline.safetensors",
               "foundation/config.json", "foundation/model.safetensors"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny trained model folder (2 folds, pretrained 2-layer encoder) and a scan for it."""
    root = tmp_path_factory.mktemp("model_files")
    sim = SimulationConfig(n_volumes=60, fc_effect=0.6, n_sites=4)
    corpus = write_cohort(root / "corpus", 4, seed=1, fmt="timeseries", labelled=False,
                          atlas="aal3", config=sim)
    cohort = write_cohort(root / "cohort", 24, seed=2, fmt="timeseries", atlas="aal3",
                          config=sim)
    config = BrainLMConfig.tiny(num_brain_voxels=166, num_timepoints_per_voxel=40,
                                timepoint_patching_size=10, num_landmarks=16,
                                attention_probs_dropout_prob=0.0)
    found = pretrain(corpus, root / "found", config=config, atlas="aal3", epochs=1, seed=0)
    train(cohort, root / "model", foundation=found, folds=2, atlas="aal3", epochs=1,
          patience=1)
    scan = next(cohort.glob("sub-*/func/*_timeseries.tsv"))
    return root / "model", scan


@pytest.fixture
def folder(built, tmp_path):
    """A fresh copy of the tiny model folder, free to damage."""
    return Path(shutil.copytree(built[0], tmp_path / "model"))


def _card(folder) -> dict:
    return json.loads((folder / "model_card.json").read_text())


def _write_card(folder, card) -> None:
    (folder / "model_card.json").write_text(json.dumps(card, indent=2))


def _vouch(folder, rel) -> None:
    """Record a file's current SHA-256 in the card, as if the folder had been written so:
    the checks behind the hash check are reached."""
    card = _card(folder)
    card["files"][rel] = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
    _write_card(folder, card)


def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _version_id_as_in_0_1_0(root: Path) -> str:
    """weights_sha256 as fmmtc 0.1.0 defined it (hashing the files again, independently)."""
    h = hashlib.sha256()
    for path in sorted([*root.rglob("*.safetensors"), root / "model_card.json"]):
        h.update(str(path.relative_to(root)).encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


# Loading what was written ----------------------------------------------------------------------
def test_untouched_folder_loads_and_its_card_hashes_every_file(folder):
    card = _card(folder)
    assert set(card["files"]) == MODEL_FILES
    for rel, digest in card["files"].items():
        assert hashlib.sha256((folder / rel).read_bytes()).hexdigest() == digest
    ens = load_model(folder, device="cpu")
    assert len(ens.models) == 2 and ens.window == 40
    assert ens.weights_sha256 == _version_id_as_in_0_1_0(folder.resolve())


def test_bundled_demo_loads_and_its_version_id_keeps_the_formula(monkeypatch):
    monkeypatch.delenv("FMMTC_MODEL_DIR", raising=False)
    ens = load_model(device="cpu")
    assert len(ens.models) == 5
    # The rebuilt demo's card records every file, its encoder included (the pinned digests
    # of models/ensemble.py serve only demo folders written before encoder hashing), and its
    # version id is computed as fmmtc 0.1.0 defined it.
    assert {"foundation/config.json", "foundation/model.safetensors"} <= set(ens.card["files"])
    assert ens.weights_sha256 == _version_id_as_in_0_1_0(default_model_dir())


# Tamper evidence --------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", ["fold_1.safetensors", "baseline.safetensors",
                                 "foundation/model.safetensors", "foundation/config.json"])
def test_a_changed_file_is_refused_as_changed(folder, rel):
    _flip_last_byte(folder / rel)  # config.json stops being JSON: the hash is checked first
    with pytest.raises(ModelFileError,
                       match=rf"Model file '{rel}' in '.*model' does not match its card "
                             r"\(SHA-256 [0-9a-f]{16}\.\.\., the card records [0-9a-f]{16}"
                             r"\.\.\.\); the model folder was changed after it was written\. "
                             r"Restore it or retrain\."):
        load_model(folder, device="cpu")


def test_a_file_the_card_does_not_record_is_refused(folder):
    shutil.copy(folder / "fold_0.safetensors", folder / "fold_2.safetensors")
    with pytest.raises(ModelFileError, match=r"Model file 'fold_2.safetensors' in .* is not "
                                             r"recorded in its card \(model_card.json has no "
                                             r"SHA-256 for it\), so it cannot be checked"):
        load_model(folder, device="cpu")
    (folder / "fold_2.safetensors").unlink()
    card = _card(folder)
    del card["files"]["fold_1.safetensors"]
    _write_card(folder, card)
    with pytest.raises(ModelFileError, match="'fold_1.safetensors' .* is not recorded"):
        load_model(folder, device="cpu")


def test_a_card_without_encoder_hashes_is_accepted_only_for_the_demo_encoder(folder):
    card = _card(folder)
    card["files"] = {k: v for k, v in card["files"].items() if not k.startswith("foundation/")}
    _write_card(folder, card)
    with pytest.raises(ModelFileError, match="'foundation/config.json' .* is not recorded in its "
                                             "card .* only the bundled demo's encoder"):
        load_model(folder, device="cpu")


def test_a_recorded_file_that_is_gone_is_refused(folder):
    (folder / "fold_1.safetensors").unlink()
    with pytest.raises(ModelFileError,
                       match="Model file 'fold_1.safetensors' in .* is missing; its card records"):
        load_model(folder, device="cpu")


# Files that are not what they claim to be ---------------------------------------------------------
class _Trap:
    """Unpickling this creates ``marker``: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("how, kind", [("pickle", "a pickle"),
                                       ("torch.save", r"a zip archive \(torch.save\)")])
def test_a_pickle_renamed_safetensors_is_refused_and_never_unpickled(folder, tmp_path, how, kind):
    marker = tmp_path / "unpickled"
    payload = {"head.1.weight": torch.zeros(1), "trap": _Trap(marker)}
    path = folder / "fold_0.safetensors"
    if how == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(ModelFileError, match="does not match its card"):
        load_model(folder, device="cpu")  # the hash is checked before anything is parsed
    _vouch(folder, "fold_0.safetensors")
    with pytest.raises(ModelFileError,
                       match=rf"Model file 'fold_0.safetensors' in .* is {kind}, not a "
                             "safetensors file. It was not loaded, because unpickling can run "
                             "code"):
        load_model(folder, device="cpu")
    assert not marker.exists()


def test_a_truncated_file_is_refused(folder):
    path = folder / "fold_1.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _vouch(folder, "fold_1.safetensors")
    with pytest.raises(ModelFileError,
                       match=r"Model file 'fold_1.safetensors' in .* is not a readable "
                             r"safetensors file \(.*\); it may be truncated or damaged"):
        load_model(folder, device="cpu")


@pytest.mark.parametrize("change, match", [
    (lambda s: s | {"head.1.weight": torch.zeros(3, 5)},
     r"1 tensor\(s\) of the wrong shape: head.1.weight \(3, 5\) \(expected \(64, \d+\)\)"),
    (lambda s: {k: v for k, v in s.items() if k != "head.4.bias"},
     r"1 tensor\(s\) missing: head.4.bias"),
    (lambda s: s | {"head.9.weight": torch.zeros(2)},
     r"1 unexpected tensor\(s\): head.9.weight"),
    (lambda s: s | {"ts_encoder.layernorm.weight": torch.zeros(64)},
     r"1 unexpected tensor\(s\): ts_encoder.layernorm.weight"),  # the frozen encoder's
])
def test_tensors_that_do_not_fit_the_card_are_refused(folder, change, match):
    path = folder / "fold_0.safetensors"
    save_file(change(load_file(str(path))), str(path))
    _vouch(folder, "fold_0.safetensors")
    with pytest.raises(ModelFileError, match=r"Model file 'fold_0.safetensors' in .* does not fit "
                                             r"the architecture in model_card.json: " + match):
        load_model(folder, device="cpu")


def test_a_baseline_without_its_tensors_is_refused(folder):
    path = folder / "baseline.safetensors"
    save_file({"xyz": load_file(str(path))["xyz"]}, str(path))
    _vouch(folder, "baseline.safetensors")
    with pytest.raises(ModelFileError, match=r"'baseline.safetensors' in .* does not fit the "
                                             r"card's 166 regions: cohort_mean_fc missing"):
        load_model(folder, device="cpu")


def _set(path, value):
    def change(card):
        *parents, last = path
        node = card
        for key in parents:
            node = node[key]
        node[last] = value
        return card
    return change


def _drop(key):
    def change(card):
        del card[key]
        return card
    return change


@pytest.mark.parametrize("change, match", [
    ("{not json", r"Model file 'model_card.json' in .* is not valid JSON \(.*\); expected the "
                  "model card written by `fmmtc train`"),
    ("[1, 2]", "'model_card.json' in .* holds a JSON list, not an object"),
    (_drop("files"), "'model_card.json' in .* lacks the required key\\(s\\) 'files'; expected "
                     "'files': an object mapping each weights file to its SHA-256"),
    (_drop("calibration"), "lacks the required key\\(s\\) 'calibration'"),
    (_set(["files", "fold_0.safetensors"], "abc"), "has an unusable 'files' entry"),
    (_set(["calibration", "a"], "steep"), "has an unusable 'calibration' entry"),
    (_set(["atlas"], "aal3"), "has an unusable 'atlas' entry"),
    (_set(["files", "../elsewhere.safetensors"], "0" * 64),
     r"lists '../elsewhere.safetensors' under 'files'"),
    (_set(["model", "layers"], 3), r"'model_card.json' in .* does not describe a usable model: "
                                   r"The FMM-TC config has unknown key\(s\) 'layers'"),
    (_set(["model", "head_hidden"], "wide"), "config's 'head_hidden' must be an integer"),
    (_set(["model", "modalities"], "mri"), "Invalid value for the 'modalities' parameter"),
    (_set(["model", "fc_kwargs"], {"depth": 3}), "does not describe a usable model \\(.*depth"),
])
def test_unusable_cards_are_refused(folder, change, match):
    path = folder / "model_card.json"
    if isinstance(change, str):
        path.write_text(change)
    else:
        _write_card(folder, change(_card(folder)))
    with pytest.raises(ModelFileError, match=match):
        load_model(folder, device="cpu")


def test_unusable_encoder_config_is_refused(folder):
    rel = "foundation/config.json"
    cfg = json.loads((folder / rel).read_text())
    (folder / rel).write_text(json.dumps(cfg | {"hidden_size": "large"}))
    _vouch(folder, rel)
    with pytest.raises(ModelFileError, match=r"Model file 'config.json' in '.*foundation' does "
                                             r"not describe a usable BrainLM model"):
        load_model(folder, device="cpu")
    (folder / rel).write_text("[]")
    _vouch(folder, rel)
    with pytest.raises(ModelFileError, match="'config.json' in .* holds a JSON list"):
        load_model(folder, device="cpu")


def test_a_pickle_under_the_encoder_weights_name_is_refused(built, tmp_path):
    """load_foundation on its own (a pretraining folder) refuses it the same way."""
    found = Path(shutil.copytree(built[0] / "foundation", tmp_path / "found"))
    (found / "model.safetensors").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFileError, match="'model.safetensors' in .* is a pickle"):
        load_foundation(found)


def test_missing_folder_or_card_is_refused(tmp_path):
    with pytest.raises(ModelFileError, match=r"Model folder '.*nowhere' does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelFileError, match="is not an FMM-TC model folder \\(no model_card.json"):
        load_model(tmp_path)


# Through the command line -----------------------------------------------------------------------
def test_cli_refuses_a_changed_model_with_one_error_line(built, tmp_path, capsys):
    from fmmtc_core.cli import main

    # A newline in the folder's name still gives a single line.
    folder = Path(shutil.copytree(built[0], tmp_path / "odd\nname"))
    _flip_last_byte(folder / "fold_1.safetensors")
    assert main(["explain", str(built[1]), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: Model file 'fold_1.safetensors' in ")
    assert "odd\\nname" in err and "does not match its card" in err


def test_cli_refuses_a_pickled_fold_with_one_error_line(folder, built, capsys):
    from fmmtc_core.cli import main

    (folder / "fold_0.safetensors").write_bytes(pickle.dumps({"w": [1.0]}))
    _vouch(folder, "fold_0.safetensors")
    assert main(["explain", str(built[1]), "--model", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: Model file 'fold_0.safetensors' in ") and "is a pickle" in err


def test_write_model_folder_hashes_what_it_writes_and_drops_stale_folds(tmp_path):
    from fmmtc_core.models.ensemble import write_model_folder

    base = {"xyz": torch.zeros(3, 3), "cohort_mean_fc": torch.zeros(3, 3)}
    states = [{"w": torch.full((2,), float(k))} for k in range(3)]
    out = write_model_folder(tmp_path / "m", fold_states=states, baseline=base, encoder=None,
                             card={"name": "m"})
    card = _card(out)
    assert card["name"] == "m" and set(card["files"]) == {
        "fold_0.safetensors", "fold_1.safetensors", "fold_2.safetensors", "baseline.safetensors"}
    for rel, digest in card["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    # A smaller run into the same folder: the third fold would otherwise join the ensemble.
    write_model_folder(out, fold_states=states[:2], baseline=base, encoder=None, card={})
    assert sorted(p.name for p in out.glob("fold_*")) == ["fold_0.safetensors",
                                                          "fold_1.safetensors"]
    assert load_file(str(out / "fold_1.safetensors"))["w"].tolist() == [1.0, 1.0]
