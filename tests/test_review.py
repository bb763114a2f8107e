"""What the pages read off core results (fmmtc_core.review, cohort.outcome_values,
repository.screening_record): plain tables built in the core, laid out by the pages."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import fake_screening

from fmmtc_core._errors import InvalidInputError
from fmmtc_core.cohort import outcome_values
from fmmtc_core.qc import assess_scan
from fmmtc_core.atlas import load_atlas
from fmmtc_core.review import (
    attribution_nifti,
    complete_regions,
    group_attributions,
    region_quality,
    region_scores,
    scan_connectivity,
    scan_images,
    top_regions,
    with_anatomy,
)


@pytest.fixture(scope="module")
def checked(tmp_path_factory, grid_labels):
    from conftest import make_bold, save_nifti

    path = save_nifti(tmp_path_factory.mktemp("review") / "sub-r_bold.nii.gz",
                      make_bold(grid_labels))
    return assess_scan(path, atlas="aal3")


def test_region_quality_lists_every_region_with_its_coverage(checked, aal3):
    _, signals, report = checked
    table = region_quality(signals, report)
    assert list(table.columns) == ["label", "region", "lobe", "hemisphere", "voxels",
                                   "coverage", "tSNR", "covered"]  # AAL3: lobes, no sections
    assert table["coverage"].between(0, 100).all()
    np.testing.assert_allclose(table["coverage"], 100 * np.clip(signals.coverage, 0, 1),
                               atol=0.05)
    assert len(table) == aal3.n_regions and table["label"].tolist() == aal3.labels.tolist()
    assert set(table.loc[~table["covered"], "region"]) == set(report.uncovered_regions)
    assert (table["voxels"].dropna() >= 0).all()
    assert table["tSNR"].notna().any()


def test_region_quality_of_a_table_has_no_voxel_counts(tmp_path, aal3):
    np.save(tmp_path / "t.npy", np.random.default_rng(0).standard_normal((60, aal3.n_regions)))
    (tmp_path / "t.json").write_text('{"RepetitionTime": 2.0, "Atlas": "aal3"}')
    _, signals, report = assess_scan(tmp_path / "t.npy", sidecar=tmp_path / "t.json")
    table = region_quality(signals, report)
    assert table["voxels"].isna().all() and table["tSNR"].isna().all()


def test_scan_connectivity_is_the_fisher_z_of_the_cleaned_series(checked):
    from fmmtc_core.connectivity import connectivity
    from fmmtc_core.preprocess import clean

    _, signals, _ = checked
    fc = scan_connectivity(signals)
    assert fc.shape == (signals.n_regions, signals.n_regions)
    np.testing.assert_allclose(fc, connectivity(clean(signals)))
    np.testing.assert_allclose(np.diag(fc), 0.0)


def test_complete_regions_skip_regions_without_values(checked):
    _, signals, _ = checked
    ok = complete_regions(signals)
    assert np.isfinite(signals.data[:, ok]).all()
    missing = np.setdiff1d(np.arange(signals.n_regions), ok)
    assert all(np.isnan(signals.data[:, i]).any() for i in missing)
    assert complete_regions(signals, 4).tolist() == ok[:4].tolist()


def test_region_scores_put_a_summary_in_atlas_order(aal3):
    summary = [{"label": int(aal3.labels[2]), "name": aal3.names[2], "score": -0.5},
               {"label": int(aal3.labels[0]), "name": aal3.names[0], "score": 0.25}]
    table = region_scores(summary, aal3)
    assert len(table) == aal3.n_regions
    assert table["region_index"].tolist() == list(range(aal3.n_regions))
    assert table["lobe"].tolist() == table["network"].tolist() == list(aal3.groups)
    assert "section" not in table
    assert table["score"].iloc[:3].tolist() == [0.25, 0.0, -0.5]
    assert table["score"].iloc[3:].eq(0.0).all()
    top = top_regions(table, n=2)
    assert top["label"].tolist() == [int(aal3.labels[2]), int(aal3.labels[0])]


def _stored_regions(atlas, rows):
    """A stored screening's region table as an older version wrote it (a stale 'network')."""
    return pd.DataFrame([{"region_index": i, "label": int(atlas.labels[i]),
                          "name": atlas.names[i], "network": "Frontal", "ts": ts, "fc": fc,
                          "total": ts + fc} for i, ts, fc in rows])


def test_with_anatomy_replaces_a_stored_network_by_the_atlas_groups():
    hcpex = load_atlas("hcpex")
    s1_right = hcpex.names.index("Primary_Sensory_Cortex_R")
    table = with_anatomy(_stored_regions(hcpex, [(s1_right, 0.5, 0.0), (0, 0.0, 0.1)]), hcpex)
    assert list(table.columns[:5]) == ["region_index", "label", "name", "lobe", "section"]
    assert "network" not in table
    assert table["lobe"].tolist() == ["Parietal", "Occipital"]
    assert table["section"].tolist() == ["Somatosensory and Motor", "Primary Visual"]
    with pytest.raises(InvalidInputError, match="outside atlas 'HCPEx'"):
        with_anatomy(pd.DataFrame({"region_index": [426]}), hcpex)
    with pytest.raises(InvalidInputError, match="'region_index' column"):
        with_anatomy(pd.DataFrame({"name": ["x"]}), hcpex)


def test_group_attributions_sum_per_lobe_or_section():
    hcpex = load_atlas("hcpex")
    i = {n: hcpex.names.index(n) for n in ("Primary_Sensory_Cortex_L", "Area_1_R",
                                           "Primary_Motor_Cortex_L", "Thal_Centralmedian_L")}
    table = _stored_regions(hcpex, [(i["Primary_Sensory_Cortex_L"], 0.25, 0.5),
                                    (i["Area_1_R"], 0.25, 0.0),
                                    (i["Primary_Motor_Cortex_L"], 0.0, -0.25),
                                    (i["Thal_Centralmedian_L"], -2.0, 0.0)])
    lobes = group_attributions(table, hcpex)
    assert list(lobes) == ["Subcortical", "Parietal", "Frontal"]  # by |total|
    assert lobes["Parietal"] == {"ts": 0.5, "fc": 0.5, "total": 1.0}
    sections = group_attributions(table, hcpex, by="section")
    assert list(sections) == ["Thalamus", "Somatosensory and Motor"]
    assert sections["Somatosensory and Motor"]["total"] == pytest.approx(0.75)
    with pytest.raises(InvalidInputError, match="Allowed values are 'lobe', but got"):
        group_attributions(table.head(0), load_atlas("aal3"), by="section")


def test_top_regions_rank_by_absolute_value_and_keep_ties_in_order():
    table = pd.DataFrame({"name": list("abcd"), "total": [0.1, -0.3, 0.3, 0.0]})
    assert top_regions(table, "total", 3)["name"].tolist() == ["b", "c", "a"]


def test_outcome_values():
    y = outcome_values(pd.Series(["responder", None, "non-responder", "unknown"]))
    assert y[0] == 1.0 and y[2] == 0.0 and np.isnan(y[1]) and np.isnan(y[3])
    assert outcome_values([]).shape == (0,)


def test_screening_record_holds_plain_values(tmp_path):
    from fmmtc_core.store import open_database, session_scope
    from fmmtc_core.store import repository as repo

    engine = open_database(f"sqlite:///{tmp_path / 'r.db'}")
    with session_scope(engine, write=True) as s:
        sid = fake_screening(s, "PAIN-0007", n_regions=3, prob=0.7).id
    with session_scope(engine) as s:
        rec = repo.screening_record(s, sid)
    assert isinstance(rec, repo.ScreeningRecord)
    sm = rec.summary  # the same typed summary a fresh screening has
    assert (sm.screening_id, sm.participant, sm.simulated) == (sid, "PAIN-0007", False)
    assert sm.probability == pytest.approx(0.7)
    assert sm.band == pytest.approx((0.6, 0.8))
    assert (sm.model, rec.atlas, rec.tr, sm.ig_steps) == ("m", "X", 2.0, 8)
    assert sm.created_at.tzinfo is not None and sm.operator == "t"
    assert [r.name for r in sm.regions] == ["r2", "r1", "r0"]  # by |score|
    assert rec.regions["name"].tolist() == ["r0", "r1", "r2"]
    assert rec.connections.to_dict("records") == [
        {"i": 0, "j": 1, "label_i": 1, "label_j": 2, "name_i": "r0", "name_j": "r1",
         "score": 0.5}]
    assert rec.series.shape == (100, 3)
    with session_scope(engine) as s, pytest.raises(InvalidInputError, match="No screening "):
        repo.screening_record(s, 99)
    engine.dispose()


def test_scan_images_are_the_voxelwise_mean_and_tsnr(tmp_path, grid_labels, aal3):
    from conftest import make_bold, save_nifti

    import nibabel as nib

    bold = make_bold(grid_labels, seed=3)
    bold[2, 3, 4, 7] = np.nan  # a voxel with a missing value has no tSNR
    path = save_nifti(tmp_path / "sub-i_bold.nii.gz", bold)
    scan, _, _ = assess_scan(path, atlas="aal3")
    images = scan_images(scan, aal3, block_bytes=4096)  # many small blocks
    data = np.asarray(nib.load(path).dataobj, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean, sd = data.mean(axis=3), data.std(axis=3)
        expected_tsnr = mean / sd
    brain = grid_labels.region_index >= 0
    np.testing.assert_allclose(np.asarray(images.mean.dataobj)[brain], mean[brain], rtol=1e-5)
    tsnr = np.asarray(images.tsnr.dataobj)
    np.testing.assert_allclose(tsnr[brain & np.isfinite(mean)],
                               expected_tsnr[brain & np.isfinite(mean)], rtol=1e-3)
    assert tsnr[2, 3, 4] == 0 and (tsnr[~brain] == 0).all()  # NaN voxel, flat background
    assert images.mean.shape == bold.shape[:3]
    np.testing.assert_array_equal(images.labels.affine, images.mean.affine)
    assert (np.asarray(images.labels.dataobj) > 0).sum() == brain.sum()


def test_scan_images_need_an_image(tmp_path, aal3):
    np.save(tmp_path / "t.npy", np.random.default_rng(0).standard_normal((60, aal3.n_regions)))
    (tmp_path / "t.json").write_text('{"RepetitionTime": 2.0, "Atlas": "aal3"}')
    scan, _, _ = assess_scan(tmp_path / "t.npy", sidecar=tmp_path / "t.json")
    with pytest.raises(InvalidInputError, match="is a region table: there is no image"):
        scan_images(scan, aal3)


def test_attribution_nifti_puts_each_score_in_its_region(tmp_path, aal3):
    import gzip

    import nibabel as nib

    scores = np.linspace(-1, 1, aal3.n_regions)
    raw = attribution_nifti(aal3, scores)
    assert raw[:2] == b"\x1f\x8b"  # gzip
    (tmp_path / "map.nii.gz").write_bytes(raw)
    img = nib.load(tmp_path / "map.nii.gz")
    assert img.get_data_dtype() == np.float32
    assert img.header.get_intent()[0] == "estimate"
    assert b"attribution" in img.header["descrip"].tobytes()
    np.testing.assert_array_equal(img.affine, aal3.labels_img.affine)
    data = np.asarray(img.dataobj)
    labels = np.asarray(aal3.labels_img.dataobj)
    for i in (0, 57, aal3.n_regions - 1):
        assert np.allclose(data[labels == aal3.labels[i]], scores[i])
    assert (data[labels == 0] == 0).all()
    assert gzip.decompress(raw)[344:348] == b"n+1\x00"  # a single-file NIfTI-1
    with pytest.raises(InvalidInputError, match="Expected 166 region scores"):
        attribution_nifti(aal3, [0.0, 1.0])
