"""The foundation-encoder registry: preprocessing steps by hand, detection and refusals, the atlas
match, the embedding cache and ``fmmtc foundation inspect``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import foundation_layouts as fl
from fmmtc_core import InvalidInputError
from fmmtc_core.atlas import load_atlas, read_coordinates_file
from fmmtc_core.cli import main
from fmmtc_core.config import DEMO_MODEL_DIR
from fmmtc_core.models.embedding_cache import EmbeddingCache
from fmmtc_core.models.encoder_base import (
    EncoderEntry,
    FoundationEncoder,
    RobustScaling,
    cut_windows,
    resample_to_tr,
    stable_y_order,
)
from fmmtc_core.models.registry import detect_entry, inspect_encoder, load_encoder


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models: one thread is faster, and immune to a busy machine's thread contention."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------------------------
# Preprocessing, step by step, against hand-computed values
# --------------------------------------------------------------------------------------------
def test_resampling_by_hand_and_as_torch_interpolate():
    x = np.arange(4.0)[:, None]
    # 4 samples at 1.47 s -> round(1.47 * 4 / 0.735) = 8 samples; sample j reads the input at
    # (j + 0.5) * 4 / 8 - 0.5 = 0.5 j - 0.25 (clamped at 0)
    up = resample_to_tr(x, 1.47, 0.735)
    np.testing.assert_allclose(up[:, 0], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.0])
    # 6 samples at 0.49 s -> 4 samples reading (j + 0.5) * 1.5 - 0.5
    down = resample_to_tr(np.arange(6.0)[:, None], 0.49, 0.735)
    np.testing.assert_allclose(down[:, 0], [0.25, 1.75, 3.25, 4.75])
    # brainmarks' own call
    rng = np.random.default_rng(0)
    y = rng.standard_normal((37, 5))
    ref = torch.nn.functional.interpolate(torch.tensor(y.T[None]), size=round(2.0 * 37 / 0.735),
                                          mode="linear")[0].T.numpy()
    np.testing.assert_allclose(resample_to_tr(y, 2.0, 0.735), ref, rtol=0, atol=1e-12)
    # within 0.1 s of the target: not resampled; None: never
    np.testing.assert_array_equal(resample_to_tr(y, 0.8, 0.735), y)
    np.testing.assert_array_equal(resample_to_tr(y, 2.0, None), y)


def test_robust_scaling_by_hand(tmp_path):
    a = np.array([[1, np.nan, np.nan], [2, 10, np.nan], [3, 20, np.nan], [4, 30, np.nan]])
    b = np.array([[5, 40, np.nan], [6, np.nan, np.nan], [7, np.nan, np.nan], [8, np.nan, np.nan]])
    stats = RobustScaling.fit([a, b], atlas="toy")
    # region 0: samples 1..8 -> quartiles 2.75, 4.5, 6.25 (linear interpolation)
    # region 1: finite samples 10, 20, 30, 40 -> 17.5, 25, 32.5; region 2: no signal -> 0, 1
    np.testing.assert_allclose(stats.median, [4.5, 25, 0])
    np.testing.assert_allclose(stats.iqr, [3.5, 15, 1])
    assert (stats.n_scans, stats.n_samples) == (2, 8)
    got = stats.apply(np.array([[8.0, 40.0, 3.0], [4.5, np.nan, 0.0]]), max_value=5.6430855)
    np.testing.assert_allclose(got, [[3.5 / (3.5 + 1e-6) / 5.6430855, 15 / (15 + 1e-6) / 5.6430855,
                                      3 / (1 + 1e-6) / 5.6430855], [0, 0, 0]])
    again = RobustScaling.load(stats.save(tmp_path), n_regions=3)
    np.testing.assert_array_equal(again.median, stats.median)
    assert again.digest == stats.digest and again.atlas == "toy"
    with pytest.raises(InvalidInputError, match="statistics for 3 regions; the encoder expects 4"):
        RobustScaling.load(tmp_path / "robust_scaling.json", n_regions=4)
    (tmp_path / "robust_scaling.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InvalidInputError, match="has format 'other'"):
        RobustScaling.load(tmp_path / "robust_scaling.json")


def test_robust_scaling_of_a_region_constant_in_training():
    # IQR 0: a later scan's variation there would be divided by 1e-6 (values ~1e6)
    flat = np.column_stack([np.arange(8.0), np.full(8, 3.0)])
    stats = RobustScaling.fit([flat])
    np.testing.assert_allclose(stats.median, [3.5, 3.0])
    np.testing.assert_allclose(stats.iqr, [3.5, 1.0])
    got = stats.apply(np.array([[3.5, 5.0]]))
    np.testing.assert_allclose(got, [[0.0, 2.0 / (1 + 1e-6)]])
    np.testing.assert_array_equal(stats.apply(flat)[:, 1], 0.0)  # training unchanged


def test_order_and_windows_by_hand():
    xyz = np.array([[0, 3, 0], [0, 1, 0], [0, 3, 0], [0, 0, 0], [0, 1, 0]], float)
    assert stable_y_order(xyz).tolist() == [3, 1, 4, 0, 2]  # ties keep label order
    assert stable_y_order(xyz).tolist() == fl.y_order(xyz)
    x = np.arange(5.0)[:, None]
    wins, padded = cut_windows(x, 2)
    assert padded == 0 and wins[:, :, 0].tolist() == [[0, 1], [2, 3]]  # the tail is left out
    wins, _ = cut_windows(x, 2, span="centre")
    assert wins[:, :, 0].tolist() == [[1, 2]]
    wins, padded = cut_windows(np.array([[0.0]]), 3, pad=np.array([9.0]))
    assert padded == 2 and wins[:, :, 0].tolist() == [[0, 9, 9]]


class _Toy(FoundationEncoder):
    """CLS = the flattened window: pooling can be checked by hand."""

    def _forward_windows(self, x, noise):
        return torch.cat([x.flatten(1)[:, None], x.flatten(1)[:, None]], dim=1)


def _toy(**kw) -> _Toy:
    entry = EncoderEntry(
        name="toy", family="brainlm_mae", description="", n_parameters=0, atlas="A3",
        n_regions=3, tr=0.735, window=2, hidden_size=6, normalisation="global-robust",
        max_value=2.0, region_order="y-sorted", channels=0, image_size=None, pad_value=None,
        token_order="natural", order_samples=1, readout="final-norm", token_pooling="cls",
        window_pooling="mean", patch=(1, 1))
    entry = replace(entry, **kw)
    scaling = RobustScaling(median=np.array([1.0, 0.0, 10.0]), iqr=np.array([2.0, 1.0, 4.0]),
                            epsilon=0.0)
    return _Toy(entry, nn.Identity(), ".", scaling=scaling,
                region_index=stable_y_order(np.array([[0, 5, 0], [0, -1, 0], [0, 5, 0]])))


def test_the_whole_chain_by_hand():
    enc = _toy()
    signals = np.array([[1.0, 0, 18], [3, 2, 14], [5, 2, 10]])  # 3 samples at TR 1.47 s
    # scaled: (x - median) / iqr / 2
    #   region 0: 0, .5, 1   region 1: 0, 1, 1   region 2: 1, .5, 0
    # resampled to 6 samples (reading 0, .25, .75, 1.25, 1.75, 2):
    #   region 0: 0, .125, .375, .625, .875, 1
    #   region 1: 0, .25, .75, 1, 1, 1
    #   region 2: 1, .875, .625, .375, .125, 0
    # rows by Y: region 1 (Y -1), region 0 (Y 5), region 2 (Y 5, after region 0)
    expected = np.array([
        [[0, .25], [0, .125], [1, .875]],
        [[.75, 1], [.375, .625], [.625, .375]],
        [[1, 1], [.875, 1], [.125, 0]],
    ])
    got = enc.windows(signals, 1.47)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-7)
    plan = enc.plan(3, 1.47)
    assert (plan.resampled, plan.n_resampled, plan.n_windows, plan.n_padded) == (True, 6, 3, 0)
    assert plan.span == (0, 3) and plan.seconds == pytest.approx(6 * 0.735)
    # pooling: the mean of the per-window CLS (here the flattened windows)
    np.testing.assert_allclose(enc.embed_scan(signals, 1.47), expected.reshape(3, 6).mean(0),
                               atol=1e-7)
    np.testing.assert_allclose(enc.embed_scan(signals, 1.47, window_pooling="centre"),
                               expected[1].reshape(6), atol=1e-7)
    # a short scan is padded with each region's mean of the scaled series
    short = enc.windows(np.array([[3.0, 2.0, 18.0]]), 0.735)  # scaled: .5, 1, 1
    np.testing.assert_allclose(short.numpy(), [[[1, 1], [.5, .5], [1, 1]]])
    # channels, as the ViT-MAE takes them; and back to the atlas order
    three = _toy(channels=3).windows(signals, 1.47)
    assert three.shape == (3, 3, 3, 2)
    back = enc.to_atlas_order(three, reduce="mean")
    np.testing.assert_allclose(back[:, 0].numpy(), expected[:, 1], atol=1e-7)


def test_per_window_scaling_is_make_window():
    from fmmtc_core.preprocess import make_window

    enc = _toy(normalisation="window-robust", tr=None, max_value=1.0, window=40,
               region_order="atlas")
    enc.region_index = np.arange(3)
    x = np.random.default_rng(1).standard_normal((130, 3))
    wins = enc.windows(x, 2.0)
    assert wins.shape == (3, 3, 40)
    for k in range(3):
        np.testing.assert_allclose(wins[k].numpy(), make_window(x, 40, start=40 * k), atol=1e-6)
    np.testing.assert_allclose(enc.windows(x, 2.0, span="centre")[0].numpy(),
                               make_window(x, 40), atol=1e-6)
    np.testing.assert_allclose(enc.windows(x[:25], 2.0)[0].numpy(), make_window(x[:25], 40),
                               atol=1e-6)


def test_bad_series_are_refused():
    enc = _toy()
    with pytest.raises(InvalidInputError, match=r"expects 3 A3 regions .* got 4 columns"):
        enc.windows(np.zeros((10, 4)), 1.0)
    with pytest.raises(InvalidInputError, match="empty"):
        enc.windows(np.zeros((0, 3)), 1.0)
    with pytest.raises(InvalidInputError, match="tr must be a positive number"):
        enc.windows(np.zeros((10, 3)), 0.0)
    with pytest.raises(InvalidInputError, match="Invalid value for the 'window_pooling'"):
        enc.embed_scan(np.zeros((10, 3)), 1.0, window_pooling="max")


# --------------------------------------------------------------------------------------------
# Detection and refusals
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    xyz = fl.write_a424_coordinates(root / "A424_Coordinates.dat")
    fl.write_vitmae_checkpoint(root / "vitmae", patch=16)
    fl.write_legacy_checkpoint(root / "legacy")
    return root, xyz


def test_detection(folders):
    root, _ = folders
    assert detect_entry(root / "vitmae")[0] == "vitmae-111m"
    assert detect_entry(root / "legacy")[0] == "legacy-13m"
    assert detect_entry(DEMO_MODEL_DIR / "foundation")[0] == "fmmtc"


def _copy(src, dst, config=None, drop=None):
    dst.mkdir()
    raw = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(raw if config is None else raw | config))
    state = load_file(str(src / "model.safetensors"))
    if drop:
        state.pop(drop)
    save_file(state, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize(("change", "match"), [
    ({"model_type": "bert"}, "model_type 'bert'; expected 'brainlm_mae' .* or 'vit_mae'"),
    ({"patch_size": 8}, "patch_size 8; the BrainLM ViT-MAE checkpoints use 16"),
    ({"image_size": 224}, "image_size 224; a BrainLM ViT-MAE with 16-pixel patches pads .* 432"),
    ({"num_channels": 1}, "num_channels 1"),
    ({"num_timepoints_per_voxel": 500}, "num_timepoints_per_voxel 500"),
])
def test_mismatched_vitmae_folders_are_refused(folders, tmp_path, change, match):
    root, _ = folders
    folder = _copy(root / "vitmae", tmp_path / "x", config=change)
    with pytest.raises(InvalidInputError, match=match) as info:
        load_encoder(folder, "cpu", coordinates=root / "A424_Coordinates.dat")
    assert "config.json" in str(info.value) or "Known entries" in str(info.value)


def test_missing_parameters_files_and_coordinates_are_named(folders, tmp_path):
    root, _ = folders
    coords = root / "A424_Coordinates.dat"
    folder = _copy(root / "vitmae", tmp_path / "m",
                   drop="vit.encoder.layer.1.attention.attention.query.weight")
    with pytest.raises(InvalidInputError,
                       match="is missing 1 parameters: layers.1.attention.q_proj.weight"):
        load_encoder(folder, "cpu", coordinates=coords)
    with pytest.raises(InvalidInputError, match="does not exist"):
        load_encoder(tmp_path / "none", "cpu")
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "config.json").write_text("{}")
    (tmp_path / "pk" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InvalidInputError, match="pickled PyTorch weights"):
        load_encoder(tmp_path / "pk", "cpu")
    (tmp_path / "pk" / "model.safetensors").write_bytes(b"\x80\x04pickle")
    (tmp_path / "pk" / "config.json").write_text(json.dumps(
        json.loads((root / "vitmae" / "config.json").read_text())))
    with pytest.raises(InvalidInputError, match="is a pickle, not a safetensors file"):
        load_encoder(tmp_path / "pk", "cpu", coordinates=coords)
    with pytest.raises(InvalidInputError, match="needs its coordinate table A424_Coordinates.dat"):
        load_encoder(root / "vitmae", "cpu")
    short = tmp_path / "short.dat"
    short.write_text("".join(f"{i} 0 {i} 0\n" for i in range(1, 424)))
    with pytest.raises(InvalidInputError, match="lists 423 regions with labels 1..423"):
        load_encoder(root / "vitmae", "cpu", coordinates=short)
    legacy = _copy(root / "legacy", tmp_path / "l", config={"num_brain_voxels": 12})
    with pytest.raises(InvalidInputError, match="of 12 regions without 'fmmtc_atlas'"):
        load_encoder(legacy, "cpu", coordinates=coords)


# --------------------------------------------------------------------------------------------
# Atlas match
# --------------------------------------------------------------------------------------------
def _a424_image(path, labels=range(1, 425)):
    data = np.zeros((10, 10, 5), np.int16)
    flat = data.reshape(-1)
    flat[: len(labels)] = np.asarray(list(labels))
    affine = np.diag([8.0, 8.0, 8.0, 1.0])
    affine[:3, 3] = [-40, -40, -20]
    nib.save(nib.Nifti1Image(flat.reshape(data.shape), affine), path)
    return path


def test_coordinate_file_and_atlas_match(folders, tmp_path, aal3):
    root, xyz = folders
    coords = root / "A424_Coordinates.dat"
    labels, table = read_coordinates_file(coords)
    assert labels.tolist() == list(range(1, 425)) and np.array_equal(table, xyz)
    image = _a424_image(tmp_path / "A424+2mm.nii.gz")
    atlas = load_atlas(image, coordinates_file=coords)
    assert atlas.n_regions == 424 and atlas.centroids_source == str(coords.resolve())
    np.testing.assert_array_equal(atlas.centroids_mm, xyz)
    assert load_atlas(image).centroids_source == "label image"
    # the atlas brings the coordinates: no other argument needed
    enc = load_encoder(root / "vitmae", "cpu", atlas=atlas)
    np.testing.assert_array_equal(enc.region_index, fl.y_order(xyz))
    with pytest.raises(InvalidInputError, match="carries centres of mass of its label image"):
        load_encoder(root / "vitmae", "cpu", atlas=load_atlas(image))
    with pytest.raises(InvalidInputError, match="'AAL3' has 166 regions, but encoder "
                                                "'vitmae-111m' .* expects 424 A424 regions"):
        enc.check_atlas(aal3)
    shifted = load_atlas(_a424_image(tmp_path / "shift.nii.gz", range(2, 426)))
    with pytest.raises(InvalidInputError, match="not labels 1..424 in order"):
        enc.check_atlas(shifted)
    bad = tmp_path / "bad.dat"
    bad.write_text("1 0 0 0\n2 1 1 1\n")
    with pytest.raises(InvalidInputError, match="lists 2 regions but atlas 'A424\\+2mm' has 424"):
        load_atlas(image, coordinates_file=bad)
    bad.write_text("1 0 0\n1 2 x 3\n")
    with pytest.raises(InvalidInputError, match="bad.dat, line 2"):
        read_coordinates_file(bad)


# --------------------------------------------------------------------------------------------
# The embedding cache and the preprocessing hash
# --------------------------------------------------------------------------------------------
def test_embeddings_are_cached_by_checkpoint_and_preprocessing(folders, tmp_path, monkeypatch):
    root, _ = folders
    monkeypatch.setenv("FMMTC_CACHE_DIR", str(tmp_path / "cache"))
    enc = load_encoder(root / "vitmae", "cpu", coordinates=root / "A424_Coordinates.dat")
    rng = np.random.default_rng(0)
    scan = rng.standard_normal((300, 424))
    enc.fit_scaling([scan])
    first = enc.embed_cohort([scan], 0.735)
    store = EmbeddingCache()
    assert store.root == tmp_path / "cache" / "embeddings" and len(store) == 1
    calls = []
    monkeypatch.setattr(type(enc), "embed_windows", lambda self, x: calls.append(1))
    np.testing.assert_array_equal(enc.embed_cohort([scan], 0.735), first)  # no recompute
    assert not calls
    old_hash = enc.preprocessing_hash
    enc.fit_scaling([scan * 2])  # other statistics: another hash, a miss
    assert enc.preprocessing_hash != old_hash
    with pytest.raises(TypeError):
        enc.embed_cohort([scan], 0.735)  # the patched embed_windows ran
    monkeypatch.undo()
    # a damaged entry is recomputed
    for f in (tmp_path / "cache" / "embeddings").rglob("*.safetensors"):
        f.write_bytes(b"damaged")
    monkeypatch.setenv("FMMTC_CACHE_DIR", str(tmp_path / "cache"))
    enc.fit_scaling([scan])
    np.testing.assert_allclose(enc.embed_cohort([scan], 0.735), first, rtol=1e-6)


def test_project_encoder_keeps_the_demo_models_embedding():
    """entry "fmmtc" with the centred window is exactly what the demo model was trained on."""
    from fmmtc_core.atlas import load_atlas as atlas_of
    from fmmtc_core.models.foundation import load_foundation
    from fmmtc_core.preprocess import make_window

    enc = load_encoder(DEMO_MODEL_DIR / "foundation", "cpu")
    e = enc.entry
    assert (e.name, e.atlas, e.n_regions, e.tr, e.token_order) == ("fmmtc", "HCPEx", 426, None,
                                                                    "natural")
    x = np.random.default_rng(3).standard_normal((260, 426)).astype(np.float32)
    old = load_foundation(DEMO_MODEL_DIR / "foundation", encoder_only=True)
    xyz = torch.tensor(atlas_of("hcpex").centroids_mm, dtype=torch.float32)
    with torch.no_grad():
        ref = old.embed(torch.from_numpy(make_window(x, 200, tr=2.0))[None], xyz)[0]
    np.testing.assert_array_equal(enc.embed_scan(x, 2.0, window_pooling="centre"), ref.numpy())
    assert enc.windows(x, 2.0).shape == (1, 426, 200)


# --------------------------------------------------------------------------------------------
# fmmtc foundation inspect
# --------------------------------------------------------------------------------------------
def test_inspect_says_what_happens_to_a_scan(folders, capsys):
    root, _ = folders
    info = inspect_encoder(root / "vitmae", tr=2.0, n_volumes=300, scan_regions=426)
    assert info["entry"]["name"] == "vitmae-111m" and info["coordinates"]["found"] is False
    assert info["example"]["n_resampled"] == 816 and info["example"]["n_windows"] == 4
    assert any("426 regions is refused" in n for n in info["notes"])
    code = main(["foundation", "inspect", str(root / "vitmae"), "--coordinates",
                 str(root / "A424_Coordinates.dat"), "--tr", "2", "--volumes", "300"])
    out, err = capsys.readouterr()
    assert code == 0 and not err
    assert "vitmae-111m" in out and "padded to 432 x 432 with -1" in out
    assert "becomes 816 samples: 4 window(s) of 200" in out
    assert "robust_scaling.json is missing" in out
    code = main(["foundation", "inspect", str(root / "legacy"), "--json"])
    info = json.loads(capsys.readouterr()[0])
    assert code == 0 and info["entry"]["token_order"] == "shuffle"
    assert info["coordinates"]["found"] is False
    code = main(["foundation", "inspect", str(root / "nowhere")])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_a_cache_write_that_fails_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.numpy

    store = EmbeddingCache(tmp_path / "cache")
    key = "ab" * 32

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")  # written in part, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    assert store.put(key, np.zeros((2, 3), np.float32)) is None
    assert list((tmp_path / "cache").rglob("*")) == [store.path(key).parent]  # the folder only
    assert store.get(key) is None
