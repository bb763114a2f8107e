"""Settings: where a deployment's files go (fmmtc_core.config)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fmmtc_core import config

ROOT = Path(__file__).resolve().parents[1]


def test_library_caches_follow_the_data_folder(monkeypatch, tmp_path):
    for key in ("MPLCONFIGDIR", "FMMTC_CACHE_DIR", "FMMTC_DATA_DIR"):
        monkeypatch.delenv(key, raising=False)
    assert config.use_cache_dir_for_libraries() is None  # nothing named: the user's defaults
    assert "MPLCONFIGDIR" not in os.environ
    monkeypatch.setenv("FMMTC_DATA_DIR", str(tmp_path / "data"))
    folder = config.use_cache_dir_for_libraries()
    assert folder == tmp_path / "data" / "cache" / "matplotlib" and folder.is_dir()
    assert os.environ["MPLCONFIGDIR"] == str(folder)
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mine"))
    assert config.use_cache_dir_for_libraries() is None  # an explicit setting wins
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path / "mine")


def test_a_glass_brain_writes_nothing_to_the_home_folder(tmp_path):
    """With FMMTC_DATA_DIR set, drawing the dashboard's glass brain (matplotlib, nilearn) in a
    fresh process leaves the home folder empty: the font cache is under the data folder."""
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MPLCONFIGDIR", "FMMTC_CACHE_DIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    env.update(HOME=str(home), FMMTC_DATA_DIR=str(data), PYTHONPATH=str(ROOT))
    code = ("import nibabel as nib, numpy as np\n"
            "from fmmtc_core.figures import glass_brain_figure\n"
            "d = np.zeros((20, 24, 20), np.float32); d[5:9, 8:12, 8:12] = 1.0\n"
            "a = np.diag([8.0, 8.0, 8.0, 1.0]); a[:3, 3] = [-80, -110, -70]\n"
            "glass_brain_figure(nib.Nifti1Image(d, a)).savefig('/dev/null', format='png')\n")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=tmp_path,
                   capture_output=True, timeout=300)
    assert [p.name for p in home.iterdir()] == []
    assert (data / "cache" / "matplotlib").is_dir()
