"""Bundled and user atlases: regions, centroids, groups, caching, grid projection."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import GRID_AFFINE, GRID_SHAPE

from fmmtc_core import InvalidInputError
from fmmtc_core.anatomy import (
    HCP_MMP_SECTIONS,
    SUBCORTICAL_STRUCTURES,
    hcp_mmp_areas,
    region_anatomy,
)
from fmmtc_core.atlas import Atlas, cache_dir, load_atlas

LOBES = {"Frontal", "Parietal", "Temporal", "Occipital", "Insula", "Cingulate", "Limbic",
         "Subcortical", "Cerebellum", "Other", "Unassigned"}

#: Regions a clinician reads first in a pain study, where they lie (HCPEx names without the
#: hemisphere suffix): (lobe, HCP-MMP section or subcortical structure).
KNOWN_REGIONS = {
    "Primary_Visual_Cortex": ("Occipital", "Primary Visual"),  # V1
    "Primary_Sensory_Cortex": ("Parietal", "Somatosensory and Motor"),  # S1, area 3b
    "Area_3a": ("Parietal", "Somatosensory and Motor"),
    "Area_1": ("Parietal", "Somatosensory and Motor"),
    "Area_2": ("Parietal", "Somatosensory and Motor"),
    "Primary_Motor_Cortex": ("Frontal", "Somatosensory and Motor"),  # M1, area 4
    "Area_OP1-SII": ("Parietal", "Posterior Opercular"),  # secondary somatosensory cortex
    "Area_OP4-PV": ("Parietal", "Posterior Opercular"),
    "IntraParietal_Sulcus_Area_1": ("Parietal", "Dorsal Stream Visual"),
    "Primary_Auditory_Cortex": ("Temporal", "Early Auditory"),  # A1
    "Insular_Granular_Complex": ("Insula", "Insular and Frontal Opercular"),  # posterior insula
    "Middle_Insular_Area": ("Insula", "Insular and Frontal Opercular"),
    "Anterior_Agranular_Insula_Complex": ("Insula", "Insular and Frontal Opercular"),
    "Area_Posterior_Insular_1": ("Insula", "Insular and Frontal Opercular"),
    "Area_a24": ("Cingulate", "Anterior Cingulate and Medial Prefrontal"),  # ACC
    "Area_p32": ("Cingulate", "Anterior Cingulate and Medial Prefrontal"),
    "Area_25": ("Cingulate", "Anterior Cingulate and Medial Prefrontal"),  # subgenual
    "Dorsal_Area_24d": ("Cingulate", "Paracentral Lobular and Mid Cingulate"),  # MCC
    "Area_23d": ("Cingulate", "Posterior Cingulate"),
    "Area_7m": ("Parietal", "Posterior Cingulate"),  # precuneus
    "Orbital_Frontal_Complex": ("Frontal", "Orbital and Polar Frontal"),
    "Area_46": ("Frontal", "DorsoLateral Prefrontal"),  # DLPFC
    "Area_44": ("Frontal", "Inferior Frontal"),
    "Hippocampus": ("Limbic", "Medial Temporal"),
    "Entorhinal_Cortex": ("Limbic", "Medial Temporal"),
    "Area_TE1_Middle": ("Temporal", "Lateral Temporal"),
    "Thal_Ventral_posterolateral": ("Subcortical", "Thalamus"),  # VPL: the spinothalamic relay
    "Thal_Centralmedian": ("Subcortical", "Thalamus"),
    "Thal_Mediodorsomedial_magnocellular": ("Subcortical", "Thalamus"),
    "Putamen": ("Subcortical", "Striatum"),
    "Caudate": ("Subcortical", "Striatum"),
    "Nucleus_Accumbens": ("Subcortical", "Striatum"),
    "Globus_pallidus_internalis": ("Subcortical", "Pallidum"),
    "Amygdala": ("Subcortical", "Amygdala"),
    "Ventral_tegmenta_area": ("Subcortical", "Midbrain"),
    "Substantia_nigra_pars_compacta": ("Subcortical", "Midbrain"),
    "Mammillary_bodies": ("Subcortical", "Hypothalamus"),
    "Nuclei_basal": ("Subcortical", "Basal forebrain"),
}


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
    assert set(atlas.sections) == set(HCP_MMP_SECTIONS) | set(SUBCORTICAL_STRUCTURES)


@pytest.mark.parametrize("hemisphere", ["L", "R"])
def test_hcpex_known_regions_lie_where_anatomy_says(hemisphere):
    atlas = load_atlas("hcpex")
    where = {name.lower(): (lobe, section)
             for name, lobe, section in zip(atlas.names, atlas.groups, atlas.sections)}
    for base, expected in KNOWN_REGIONS.items():
        assert where[f"{base}_{hemisphere}".lower()] == expected, base


def test_hcpex_groups_are_symmetric_for_every_region():
    atlas = load_atlas("hcpex")
    left = {n[:-2].lower(): (g, s) for n, g, s, h in
            zip(atlas.names, atlas.groups, atlas.sections, atlas.hemispheres) if h == "L"}
    right = {n[:-2].lower(): (g, s) for n, g, s, h in
             zip(atlas.names, atlas.groups, atlas.sections, atlas.hemispheres) if h == "R"}
    assert len(left) == len(right) == 213
    assert left == right  # every region, left and right (R's "posterior_OFC" case included)


def test_hcpex_sections_are_glassers_22_with_the_papers_sizes():
    atlas = load_atlas("hcpex")
    # Every cortical region has one of the 22 sections; the table covers all 180 areas.
    areas = hcp_mmp_areas()
    assert len(areas) == 180 and set(areas.values()) == set(HCP_MMP_SECTIONS)
    cortical = [s for s in atlas.sections[:360]]
    assert set(cortical) == set(HCP_MMP_SECTIONS)
    # Glasser et al. (2016) Table 1: one area in V1, three in early visual, 13 DLPFC areas.
    per_hemisphere = {s: cortical.count(s) // 2 for s in HCP_MMP_SECTIONS}
    assert per_hemisphere["Primary Visual"] == 1
    assert per_hemisphere["Early Visual"] == 3
    assert per_hemisphere["Somatosensory and Motor"] == 5
    assert per_hemisphere["DorsoLateral Prefrontal"] == 13
    assert sum(per_hemisphere.values()) == 180
    assert set(atlas.sections[360:]) == set(SUBCORTICAL_STRUCTURES)


def test_region_anatomy_reads_both_naming_schemes():
    s2 = region_anatomy("Area_OP1-SII_L")
    assert s2 is not None and (s2.area, s2.lobe) == ("OP1", "Parietal")
    assert region_anatomy("R_OP1_ROI") == s2  # the HCP-MMP label files' spelling
    assert region_anatomy("posterior_ofc_complex_r") == region_anatomy("Posterior_OFC_Complex_L")
    assert region_anatomy("Frontal_Sup_2_L") is None  # AAL3: not an HCP-MMP name
    assert region_anatomy("region_3") is None


def test_grouping_by_section_or_lobe():
    hcpex, aal3 = load_atlas("hcpex"), load_atlas("aal3")
    assert hcpex.grouping("lobe") == hcpex.groups and hcpex.grouping("section") == hcpex.sections
    assert list(hcpex.groupings) == ["lobe", "section"]
    assert "section" in hcpex.groupings["section"].lower()
    assert aal3.sections == () and list(aal3.groupings) == ["lobe"]
    with pytest.raises(InvalidInputError, match="Allowed values are 'lobe', but got 'section'"):
        aal3.grouping("section")


def test_user_atlas_lobes_are_symmetric(tmp_path):
    """Two mirror-image blobs of a user atlas get the same lobe (each voxel votes on both
    sides of the midline)."""
    data = np.zeros((20, 24, 20), dtype=np.int16)
    # x = -80 + 8 i: i 3..6 is x -56..-32, its mirror image i 14..17 is x 32..56.
    data[3:7, 10:14, 9:12] = 1
    data[14:18, 10:14, 9:12] = 2
    affine = np.array([[8.0, 0, 0, -80], [0, 8, 0, -110], [0, 0, 8, -70], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "sym.nii.gz")
    atlas = load_atlas(tmp_path / "sym.nii.gz")
    assert atlas.groups[0] == atlas.groups[1] != "Unassigned"
    assert atlas.sections == ()


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
