"""Bundled and user atlases: regions, centroids, groups, caching, grid projection."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import GRID_AFFINE, GRID_SHAPE

from fmmtc_core import InvalidInputError
from fmmtc_core.atlas import Atlas, cache_dir, load_atlas

LOBES = {"Frontal", "Parietal", "Temporal", "Occipital", "Insula", "Cingulate", "Limbic",
         "Subcortical", "Cerebellum", "Other", "Unassigned"}


def test_hcpex_is_the_426_region_default():
    atlas = load_atlas()
    assert atlas.name == "HCPEx" and atlas.n_regions == 426
    assert atlas.labels.tolist() == list(range(1, 427))
    assert atlas.names[0] == "Primary_Visual_Cortex_L"
    # The cached image is int16 on fMRIPrep's 2 mm MNI grid.
    assert atlas.labels_img.get_data_dtype() == np.int16
    assert atlas.labels_img.shape == (97, 115, 97)
    np.testing.assert_allclose(atlas.labels_img.affine[:3, 3], [-96, -132, -78])
    np.testing.assert_allclose(np.diag(atlas.labels_img.affine)[:3], [2, 2, 2])
    # 360 cortical HCP-MMP areas + 66 subcortical regions, grouped accordingly.
    assert sum(g == "Subcortical" for g in atlas.groups) == 66
    assert set(atlas.groups) <= LOBES
    assert atlas.groups[0] == "Occipital"  # V1


def test_names_are_case_insensitive_and_memoised():
    assert load_atlas("HCPEX") is load_atlas("hcpex")
    assert load_atlas("AAL3") is load_atlas("aal3")


def test_centroids_and_hemispheres_are_anatomically_plausible():
    for name in ("hcpex", "aal3"):
        atlas = load_atlas(name)
        x = atlas.centroids_mm[:, 0]
        hemi = np.array(atlas.hemispheres)
        assert np.all(x[hemi == "L"] < 0) and np.all(x[hemi == "R"] > 0)
        assert np.all(np.abs(atlas.centroids_mm) < 110)
        assert np.all(atlas.volumes_mm3 > 0)


def test_aal3_groups_follow_its_names():
    atlas = load_atlas("aal3")
    groups = dict(zip(atlas.names, atlas.groups))
    assert groups["Precentral_L"] == "Frontal"
    assert groups["Hippocampus_L"] == "Limbic"
    assert groups["Cerebellum_Crus1_L"] == "Cerebellum"
    assert groups["Thal_AV_L"] == "Subcortical"


def test_disk_cache_is_reused(tmp_path, monkeypatch):
    from fmmtc_core import atlas as atlas_mod

    monkeypatch.setenv("FMMTC_CACHE_DIR", str(tmp_path))
    atlas_mod._load_cached.cache_clear()
    first = load_atlas("aal3")
    files = sorted(p.name for p in (tmp_path / "atlases").iterdir())
    assert any(f.endswith(".nii.gz") for f in files) and any(f.endswith(".json") for f in files)
    atlas_mod._load_cached.cache_clear()
    second = load_atlas("aal3")  # read back from the cache files
    assert second is not first
    assert second.names == first.names and second.groups == first.groups
    np.testing.assert_array_equal(
        np.asanyarray(second.labels_img.dataobj), np.asanyarray(first.labels_img.dataobj)
    )
    np.testing.assert_allclose(second.centroids_mm, first.centroids_mm)
    assert cache_dir() == tmp_path
    atlas_mod._load_cached.cache_clear()


def test_on_grid_is_memoised_and_reports_coverage(aal3):
    g1 = aal3.on_grid(GRID_SHAPE, GRID_AFFINE)
    assert aal3.on_grid(GRID_SHAPE, GRID_AFFINE) is g1
    assert g1.labels_data.shape == GRID_SHAPE and g1.labels_data.dtype == np.int16
    assert g1.n_voxels.sum() == (g1.region_index >= 0).sum()
    assert 0.9 < g1.fraction_covered <= 1.0
    # Small regions vanish on a 6 mm grid: they show as zero voxels, not as an error.
    assert (g1.n_voxels == 0).any()


def test_on_grid_fsl_orientation():
    # FSL's MNI152 2 mm grid runs x from right to left (negative x step).
    atlas = load_atlas("hcpex")
    affine = np.array([[-2.0, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72], [0, 0, 0, 1]])
    grid = atlas.on_grid((91, 109, 91), affine)
    assert grid.fraction_covered > 0.95
    # Voxel (i, j, k) with x = 90 - 2 i > 0 lies in the right hemisphere.
    ii = np.argwhere(grid.region_index >= 0)
    hemi = np.array(atlas.hemispheres)[grid.region_index[tuple(ii.T)]]
    x = 90 - 2 * ii[:, 0]
    assert np.mean((x > 0) == (hemi == "R")) > 0.99


def _user_atlas(tmp_path, values=None):
    data = np.zeros((20, 24, 20), dtype=np.int16)
    data[2:9, 4:20, 4:16] = 3
    data[11:18, 4:20, 4:16] = 7
    img = nib.Nifti1Image(data if values is None else values, np.array(
        [[8.0, 0, 0, -80], [0, 8, 0, -110], [0, 0, 8, -70], [0, 0, 0, 1]]))
    path = tmp_path / "myatlas.nii.gz"
    nib.save(img, path)
    return path


def test_user_atlas_with_and_without_label_table(tmp_path):
    path = _user_atlas(tmp_path)
    atlas = load_atlas(path)
    assert isinstance(atlas, Atlas)
    assert atlas.labels.tolist() == [3, 7]
    assert atlas.names == ("region_3", "region_7")
    assert atlas.hemispheres == ("L", "R")
    (tmp_path / "myatlas2.tsv").write_text("index\tname\n3\tLeftBlob\n7\tRightBlob\n")
    (tmp_path / "myatlas.nii.gz").rename(tmp_path / "myatlas2.nii.gz")
    atlas2 = load_atlas(tmp_path / "myatlas2.nii.gz")
    assert atlas2.names == ("LeftBlob", "RightBlob")
    assert set(atlas2.groups) <= LOBES


def test_user_atlas_refusals(tmp_path):
    with pytest.raises(InvalidInputError, match="Unknown atlas 'schaefer'.*'hcpex', 'aal3'"):
        load_atlas("schaefer")
    prob = np.random.default_rng(0).random((20, 24, 20)).astype(np.float32)
    path = _user_atlas(tmp_path, values=prob)
    with pytest.raises(InvalidInputError, match="holds non-integer values"):
        load_atlas(path)
    (tmp_path / "z.nii.gz").write_bytes(b"garbage")
    with pytest.raises(InvalidInputError, match="not a readable NIfTI label image"):
        load_atlas(tmp_path / "z.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.int16), np.eye(4)), tmp_path / "e.nii.gz")
    with pytest.raises(InvalidInputError, match="has no labelled voxels"):
        load_atlas(tmp_path / "e.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5, 3), np.int16), np.eye(4)), tmp_path / "f.nii.gz")
    with pytest.raises(InvalidInputError, match="must be a 3D label image"):
        load_atlas(tmp_path / "f.nii.gz")
    bad = tmp_path / "t.txt"
    bad.write_text("one Region\n")
    with pytest.raises(InvalidInputError, match="line 1: expected '<integer label> <name>'"):
        load_atlas(_user_atlas(tmp_path), labels_file=bad)


def test_grid_far_outside_the_atlas_covers_no_region(aal3):
    affine = np.diag([6.0, 6.0, 6.0, 1.0])
    affine[:3, 3] = 400.0  # the field of view lies entirely outside MNI space
    grid = aal3.on_grid((10, 10, 10), affine)
    assert grid.n_voxels.sum() == 0 and grid.fraction_covered == 0


def test_cache_stays_under_the_data_folder_unless_set(monkeypatch, tmp_path):
    """A deployment that names its data folder keeps its caches there too (not in ~/.cache)."""
    from fmmtc_core.atlas import cache_dir

    monkeypatch.delenv("FMMTC_CACHE_DIR", raising=False)
    monkeypatch.setenv("FMMTC_DATA_DIR", str(tmp_path / "data"))
    assert cache_dir() == tmp_path / "data" / "cache"
    monkeypatch.setenv("FMMTC_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("FMMTC_CACHE_DIR")
    monkeypatch.delenv("FMMTC_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "fmmtc"
