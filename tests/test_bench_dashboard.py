"""The dashboard benchmark's seeded cohort (bench/bench_dashboard.py) is one the pages can read:
it went stale once when the schema changed (a scan row now owns its participant) and the
page-switch half of the benchmark failed before measuring anything."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from fmmtc_core.atlas import load_atlas
from fmmtc_core.models.ensemble import load_model
from fmmtc_core.store import open_database
from fmmtc_core.store.db import integrity_check
from fmmtc_core.store.repository import region_frame, screenings_frame

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_dashboard.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_dashboard", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seeded_cohort_is_sound_and_readable(bench, tmp_path):
    from fmmtc_core.store import session_scope

    url = f"sqlite:///{tmp_path / 'seeded.db'}"
    model = load_model()
    bench.seed(url, 4, model)
    engine = open_database(url)
    try:
        assert integrity_check(engine) == []
        frame = screenings_frame(engine)
        assert len(frame) == 4 and frame["participant"].str.startswith("BENCH-").all()
        with session_scope(engine) as s:
            regions = region_frame(s, int(frame["screening_id"].iloc[0]))
        assert len(regions) == load_atlas(model.atlas).n_regions
    finally:
        engine.dispose()
