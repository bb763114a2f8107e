"""The `fmmtc` command: outputs, and the one-line `error:` contract with exit status 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import fmriprep_confounds, make_bold, save_nifti

from fmmtc_core.cli import main
from fmmtc_core.explain import NESTED_STEPS
from fmmtc_core.io import load_scan
from fmmtc_core.preprocess import parcellate


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, err, match):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert match in lines[0]
    assert "Traceback" not in err


def test_parcellate_writes_xcpd_style_tsv_and_sidecar(tmp_path, bold_file, aal3, capsys):
    out = tmp_path / "out" / "sub-01_seg-AAL3_timeseries.tsv"
    code, stdout, _ = run(["parcellate", bold_file, "--atlas", "aal3", "--out", out], capsys)
    assert code == 0 and "60 volumes x 166 regions" in stdout
    table = pd.read_csv(out, sep="\t", na_values="n/a")
    assert list(table.columns) == list(aal3.names)
    ref = parcellate(load_scan(bold_file), aal3).data
    np.testing.assert_allclose(table.to_numpy(), ref, rtol=1e-6, equal_nan=True)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["RepetitionTime"] == 2.0 and side["Atlas"] == "AAL3"
    assert side["Cleaned"] is False
    # The output is itself a valid scan: a region table for AAL3.
    again = load_scan(out)
    assert again.kind == "table" and again.atlas_name == "AAL3"


def test_parcellate_clean_with_confounds(tmp_path, grid_labels, capsys):
    bold = save_nifti(tmp_path / "b.nii.gz", make_bold(grid_labels, n_volumes=80))
    conf = tmp_path / "c.tsv"
    fmriprep_confounds(80, spikes=(40,)).to_csv(conf, sep="\t", index=False, na_rep="n/a")
    out = tmp_path / "o.tsv"
    code, _, _ = run(["parcellate", bold, "--atlas", "aal3", "--confounds", conf, "--clean",
                      "--scrub", "--out", out], capsys)
    assert code == 0
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["Cleaned"] is True and 40 not in side["SampleMask"]
    assert len(pd.read_csv(out, sep="\t")) == len(side["SampleMask"]) < 80


def test_qc_json(bold_file, capsys):
    code, out, _ = run(["qc", bold_file, "--atlas", "aal3", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["verdict"] in ("pass", "warn", "fail")
    assert report["n_volumes"] == 60 and report["atlas"] == "AAL3"
    code, out, _ = run(["qc", bold_file, "--atlas", "aal3"], capsys)
    assert code == 0 and out.startswith("QC verdict: ")


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_bytes(b"\x00" * 500), "wrong magic number"),
        (lambda p: p.write_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 100), "corrupt gzip"),
    ],
)
def test_bad_input_exits_2_with_one_error_line(tmp_path, capsys, make, match):
    bad = tmp_path / "bad.nii.gz"
    make(bad)
    for cmd in (["qc", bad, "--json"], ["parcellate", bad, "--out", tmp_path / "o.tsv"]):
        code, out, err = run(cmd, capsys)
        assert_one_error_line(code, err, match)
        assert out == ""
    assert not (tmp_path / "o.tsv").exists()


def test_bad_options_exit_2(tmp_path, bold_file, capsys):
    code, _, err = run(["parcellate", bold_file, "--out", tmp_path / "o.csv"], capsys)
    assert_one_error_line(code, err, "--out must name a .tsv file")
    code, _, err = run(["parcellate", bold_file, "--atlas", "nope", "--out", tmp_path / "o.tsv"],
                       capsys)
    assert_one_error_line(code, err, "Unknown atlas 'nope'")
    with pytest.raises(SystemExit) as exc:
        main(["parcellate", str(bold_file)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: the following arguments are required")
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_missing_file_and_debug_traceback(tmp_path):
    missing = tmp_path / "none.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "fmmtc_core.cli", "qc", str(missing)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: Scan file {missing} does not exist."
    proc = subprocess.run([sys.executable, "-m", "fmmtc_core.cli", "--debug", "qc", str(missing)],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_console_script_is_installed():
    from pathlib import Path

    exe = Path(sys.executable).parent / "fmmtc"  # the venv's bin, activated or not
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("fmmtc ")


def test_simulate_writes_a_cohort(tmp_path, capsys):
    out = tmp_path / "cohort"
    code, stdout, _ = run(["simulate", out, "--subjects", "3", "--seed", "1", "--format",
                           "timeseries", "--atlas", "aal3"], capsys)
    assert code == 0 and "simulated labelled cohort of 3 subjects" in stdout
    assert (out / "participants.tsv").exists() and (out / "simulation.json").exists()
    tables = sorted(out.glob("sub-*/func/*_seg-AAL3_timeseries.tsv"))
    assert len(tables) == 3
    code, _, err = run(["simulate", out, "--subjects", "3"], capsys)
    assert_one_error_line(code, err, "already holds a cohort")
    code, _, err = run(["simulate", tmp_path / "c2", "--subjects", "1"], capsys)
    assert_one_error_line(code, err, "at least 2 subjects")


def test_pretrain_train_evaluate_commands(tmp_path, capsys):
    from fmmtc_core.simulate import SimulationConfig, write_cohort

    cfg = SimulationConfig(n_volumes=60)
    corpus = write_cohort(tmp_path / "corpus", 3, seed=1, fmt="timeseries", labelled=False,
                          atlas="aal3", config=cfg)
    cohort = write_cohort(tmp_path / "cohort", 20, seed=2, fmt="timeseries", atlas="aal3",
                          config=cfg)
    code, out, _ = run(["pretrain", corpus, "--out", tmp_path / "f", "--config", "tiny",
                        "--epochs", "1", "--atlas", "aal3"], capsys)
    assert code == 0 and "wrote the pretrained encoder" in out
    code, out, _ = run(["pretrain", corpus, "--out", tmp_path / "f2", "--config", "tiny",
                        "--epochs", "1", "--atlas", "aal3", "--windows-per-subject", "2",
                        "--regions-per-step", "32", "--schedule", "cosine", "--xyz-scale",
                        "0.01", "--lr", "5e-4", "--batch-size", "2"], capsys)
    log = json.loads((tmp_path / "f2" / "pretrain_log.json").read_text())
    assert code == 0 and (log["steps"], log["regions_per_step"], log["lr"]) == (3, 32, 5e-4)
    code, _, err = run(["pretrain", corpus, "--out", tmp_path / "f3", "--config", "tiny",
                        "--atlas", "aal3", "--regions-per-step", "1"], capsys)
    assert_one_error_line(code, err, "regions_per_step must be between 2 and the atlas's 166")
    # The tiny preset's 200-sample window is longer than these 60-volume scans: zero-padded.
    code, out, _ = run(["train", cohort, "--out", tmp_path / "m", "--foundation", tmp_path / "f",
                        "--folds", "2", "--epochs", "2", "--atlas", "aal3", "--json"], capsys)
    assert code == 0 and json.loads(out)["n_subjects"] == 20
    code, out, _ = run(["evaluate", tmp_path / "m", cohort, "--json"], capsys)
    assert code == 0 and json.loads(out)["n_subjects"] == 20
    # no --foundation: the bundled encoder (HCPEx), said on stdout; an AAL3 cohort is refused
    code, out, err = run(["train", cohort, "--out", tmp_path / "m2", "--atlas", "aal3"], capsys)
    assert_one_error_line(code, err, "takes 426 regions, but the atlas AAL3 has 166")
    assert "(the bundled demo encoder" in err
    assert "uses the bundled demo encoder" in out
    code, _, err = run(["evaluate", tmp_path, cohort], capsys)
    assert_one_error_line(code, err, "not an FMM-TC model folder")


@pytest.mark.parametrize("kind", [0, 1])
def test_explain_json(hcpex_scans, capsys, kind):
    from fmmtc_core.atlas import load_atlas

    code, out, err = run(["explain", hcpex_scans[kind], "--json"], capsys)
    assert code == 0, err
    d = json.loads(out)
    atlas = load_atlas("hcpex")
    assert len(d["regions"]) == atlas.n_regions
    assert {r["label"] for r in d["regions"]} == set(atlas.labels.tolist())
    scores = [abs(r["score"]) for r in d["regions"]]
    assert scores == sorted(scores, reverse=True)
    assert d["modality_share"]["ts"] + d["modality_share"]["fc"] == pytest.approx(1.0)
    # the demo model reads the regional amplitude too: attributed against the cohort's mean
    assert d["baseline"] == {"ts": "flat", "fc": "cohort_mean", "amplitude": "cohort_mean"}
    assert d["steps"] in NESTED_STEPS and d["ig_gap"] <= 0.01 or d["steps"] == NESTED_STEPS[-1]
    # nested: the last level's nodes, each gradient computed once for every level
    assert d["quadrature"] == "clenshaw-curtis" and d["evaluations"] == d["steps"] + 1
    assert len(d["top_connections"]) == 20 and 0 <= d["probability"] <= 1
    assert d["band"][0] <= d["probability"] <= d["band"][1]
    assert d["model"] == "fmmtc-demo" and d["model_validity"]["status"] == "simulated"


def test_explain_text_and_errors(hcpex_scans, tmp_path, capsys):
    code, out, _ = run(["explain", hcpex_scans[0], "--top", "3"], capsys)
    assert code == 0 and "responder probability" in out and "completeness gap" in out
    assert re.search(r"Integrated Gradients: \d+ gradient evaluations \(nested Clenshaw-Curtis, "
                     r"last level \d+ intervals\), completeness gap", out)
    result = out[out.index("\nWARNING: "):].splitlines()[1:]  # after the progress lines
    assert result[0].startswith("WARNING: DEMONSTRATION MODEL - TRAINED ON SIMULATED DATA ONLY")
    assert result[1].startswith("responder probability")
    assert len([ln for ln in out.splitlines() if ln.startswith("  ")]) == 3
    code, _, err = run(["explain", hcpex_scans[0], "--model", tmp_path], capsys)
    assert_one_error_line(code, err, "is not an FMM-TC model folder")
    small = tmp_path / "sub-x_seg-AAL3_timeseries.tsv"
    pd.DataFrame(np.random.default_rng(0).standard_normal((100, 166))).to_csv(
        small, sep="\t", index=False)
    code, _, err = run(["explain", small], capsys)
    assert_one_error_line(code, err, "holds AAL3 region series, but atlas HCPEx was requested")


def test_min_volumes_reaches_the_analysis(tmp_path, capsys):
    # --min-volumes used to pass the cheap header check only: the analysis kept 50 and refused.
    from fmmtc_core.simulate import SimulationConfig, write_cohort

    root = write_cohort(tmp_path / "short", 2, seed=3, fmt="timeseries",
                        config=SimulationConfig(n_volumes=45))
    scan = sorted(p for p in root.glob("sub-*/func/*_timeseries.tsv")
                  if "confounds" not in p.name)[0]
    code, _, err = run(["explain", scan, "--json"], capsys)
    assert code == 2 and "has 45 volumes; at least 50 are needed" in err
    code, out, err = run(["explain", scan, "--json", "--min-volumes", "40"], capsys)
    assert code == 0, err
    assert 0 <= json.loads(out)["probability"] <= 1
    db = f"sqlite:///{tmp_path / 's.db'}"
    code, out, err = run(["screen", scan, "--db", db, "--json", "--min-volumes", "40"], capsys)
    assert code == 0, err
    assert json.loads(out)["participant_id"] == "001"


def test_train_baseline_refuses_a_torchrun_launch(tmp_path, monkeypatch, capsys):
    for key, value in dict(WORLD_SIZE=2, RANK=0, LOCAL_RANK=0, LOCAL_WORLD_SIZE=2,
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=1).items():
        monkeypatch.setenv(key, str(value))
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "m"), "--model", "cpm"]) == 2
    assert "--model cpm runs in one process" in capsys.readouterr().err
