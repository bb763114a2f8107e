"""The bundled demo model: built end to end from simulated data, and labelled as such."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from fmmtc_core.pretraining import pretrain
from fmmtc_core.simulate import SimulationConfig, write_cohort
from fmmtc_core.training import train

__all__ = ["DEMO_NOTE", "build_demo_model", "build_platform"]

DEMO_NOTE = (
    "DEMONSTRATION MODEL trained only on SIMULATED data (fmmtc simulate). It is not for "
    "clinical use and says nothing about real patients. To train on real data: pretrain on "
    "your pain-agnostic corpus (fmmtc pretrain) or use a BrainLM checkpoint folder, then run "
    "fmmtc train on a labelled BIDS-style cohort (see README)."
)


def build_platform() -> dict:
    """The kind of CPU a build ran on, as the demo card records it (``build_platform``).

    Fixed seeds, one thread and deterministic algorithms give the same bytes on the same kind
    of CPU; torch does not promise it across kinds (its kernels and the BLAS dispatch on the
    instruction set: the demo committed before 2026-11-26, built on another machine, and a
    rebuild on an AVX-512 AMD EPYC differ by up to 5e-6 in the pretrained weights).
    ``tests/test_demo.py`` checks bit identity when this matches the card's record, and
    agreement to a tolerance otherwise.

    Returns
    -------
    dict
        ``machine`` (e.g. ``x86_64``), ``cpu`` (the model name of /proc/cpuinfo, else
        :func:`platform.processor`) and ``cpu_capability`` (torch's, e.g. ``AVX512``).
    """
    import platform

    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu": cpu,
            "cpu_capability": str(torch.backends.cpu.get_cpu_capability())}


def build_demo_model(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    n_corpus: int = 60,
    n_subjects: int = 120,
    pretrain_epochs: int = 10,
    epochs: int = 100,
    work_dir: str | os.PathLike | None = None,
    progress: Callable[[str, int, int, dict], None] | None = None,
    simulation: str = "realistic",
    preset: str = "small",
    threads: int = 1,
) -> dict:
    """Build the demo model end to end, deterministically from ``seed``.

    Simulates a pain-agnostic corpus and pretrains a ``tiny`` BrainLM encoder on it (centroids
    in decimetres, ``xyz_scale=0.01``, so they do not drown the signal part of the tokens),
    simulates a labelled cohort, and trains FMM-TC (5-fold CV) with that encoder. Both run
    with a fixed thread count and deterministic algorithms, so the same command on the same
    software gives the same bytes. The card says the model is a demonstration on simulated
    data (:data:`DEMO_NOTE`) and records the planted ground truth and the command that
    rebuilds it.

    Parameters
    ----------
    out_dir : path
        The model folder to write (replaced if it exists).
    seed : int, default=0
        Seeds the simulations (``seed + 1`` corpus, ``seed + 2`` cohort), pretraining and
        training.
    n_corpus, n_subjects : int, default=60, 120
        Subjects of the unlabelled corpus and of the labelled cohort.
    pretrain_epochs, epochs : int, default=10, 100
        Pretraining epochs; most training epochs per fold.
    work_dir : path or None, default=None
        Where the simulated data and the encoder go (kept); None: a temporary folder, removed.
    progress : callable(stage, done, total, info) or None, default=None
        As for :func:`~fmmtc_core.pretraining.pretrain` and :func:`~fmmtc_core.training.train`.
    simulation : {"realistic", "easy", "shifted"}, default="realistic"
        Simulation preset of the corpus and the cohort.
    preset : {"small", "default", "paper"}, default="small"
        FMM-TC design (:data:`fmmtc_core.models.fmmtc.PRESETS`).
    threads : int, default=1
        Torch threads of pretraining and training (with deterministic algorithms).

    Returns
    -------
    dict
        The out-of-fold metrics of :func:`~fmmtc_core.training.train`.
    """
    from fmmtc_core.models.device import deterministic

    out = Path(out_dir)
    sim = SimulationConfig.preset(simulation)
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="fmmtc-demo-"))
    try:
        corpus = write_cohort(work / "corpus", n_corpus, seed=seed + 1, fmt="timeseries",
                              labelled=False, config=sim)
        with deterministic(threads):
            foundation = pretrain(corpus, work / "foundation", config="tiny",
                                  epochs=pretrain_epochs, seed=seed, progress=progress,
                                  xyz_scale=0.01)
        cohort = write_cohort(work / "cohort", n_subjects, seed=seed + 2, fmt="timeseries",
                              config=sim)
        if out.exists():
            shutil.rmtree(out)
        metrics = train(cohort, out, foundation=foundation, seed=seed, epochs=epochs,
                        progress=progress, preset=preset, threads=threads)
        card = json.loads((out / "model_card.json").read_text())
        card["name"] = "fmmtc-demo"
        card["intended_use"] = DEMO_NOTE
        card["data"]["cohort"] = (f"simulated: fmmtc simulate --preset {simulation}, "
                                  f"{n_subjects} subjects, seed {seed + 2}")
        card["foundation"] = {
            "pretrained_on": f"simulated pain-agnostic corpus of {n_corpus} subjects "
                             f"({simulation} preset, seed {seed + 1}), {pretrain_epochs} "
                             "epochs, preset tiny, xyz_scale 0.01",
            "log": json.loads((foundation / "pretrain_log.json").read_text())
            | {"corpus": "simulated (temporary folder)" if not work_dir else str(work)},
        }
        card["training"]["foundation"] = "the encoder pretrained above (foundation/)"
        card["ground_truth"] = json.loads((cohort / "simulation.json").read_text())["planted"]
        card["build_platform"] = build_platform()
        card["build_command"] = (f"fmmtc build-demo --seed {seed} --subjects {n_subjects} "
                                 f"--corpus {n_corpus} --pretrain-epochs {pretrain_epochs} "
                                 f"--simulation {simulation} --preset {preset} "
                                 f"--threads {threads}")
        (out / "model_card.json").write_text(json.dumps(card, indent=2))
        return metrics
    finally:
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)
