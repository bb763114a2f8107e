"""Pretraining on several processes (torchrun, gloo on loopback) and its checkpoints.

The single-process behaviour (loss, resume, options) is tested in test_training.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _ddp_worker import run_worker, torchrun
from safetensors.torch import load_file

from fmmtc_core import InvalidInputError
from fmmtc_core.cli import main
from fmmtc_core.models.foundation import BrainLMConfig
from fmmtc_core.pretraining import pretrain
from fmmtc_core.simulate import SimulationConfig, write_cohort

#: The tiny test encoder, without dropout (each process would draw its own masks) and with
#: exact attention: transformers' Nystrom pseudo-inverse starts from a batch-wide maximum, so
#: with it a window's loss depends slightly on its batch-mates, i.e. on the split.
CONFIG = dict(num_brain_voxels=166, num_timepoints_per_voxel=40, timepoint_patching_size=10,
              attention_mode="exact", attention_probs_dropout_prob=0.0)
#: 5 windows in batches of 4: the second batch has one window, so with 2 processes one rank
#: holds only padding there (and must still take part, adding nothing).
OPTIONS = dict(atlas="aal3", seed=0, batch_size=4, regions_per_step=24, schedule="cosine",
               threads=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("ddp") / "corpus", 5, seed=1, fmt="timeseries",
                        labelled=False, atlas="aal3",
                        config=SimulationConfig(n_volumes=60, n_sites=2))


@pytest.fixture(scope="module")
def one_process(corpus, tmp_path_factory):
    """The reference: 2 epochs in this process."""
    out = tmp_path_factory.mktemp("one") / "enc"
    return pretrain(corpus, out, config=BrainLMConfig.tiny(**CONFIG), epochs=2, **OPTIONS)


def _log(folder):
    return json.loads((folder / "pretrain_log.json").read_text())


def _assert_same_weights(a, b):
    wa, wb = (load_file(str(f / "model.safetensors")) for f in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.endswith("attention.self.key.bias"):
            # Softmax ignores a constant added to every key score, so these biases have no
            # gradient: what they get is rounding noise, which AdamW scales up to steps of
            # ~lr whose sign depends on the summation order. They stay near their start.
            assert float((wa[k] - wb[k]).abs().max()) < 1e-3
            continue
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(corpus, one_process, tmp_path):
    two = tmp_path / "enc"
    run_worker(2, "pretrain", corpus_dir=str(corpus), out_dir=str(two), config=CONFIG,
               epochs=2, **OPTIONS)
    ref, got = _log(one_process), _log(two)
    assert len(ref["loss_per_step"]) == len(got["loss_per_step"]) == 4  # 2 epochs x 2 steps
    np.testing.assert_allclose(got["loss_per_step"], ref["loss_per_step"], rtol=1e-5)
    assert (ref["world_size_per_epoch"], got["world_size_per_epoch"]) == ([1, 1], [2, 2])
    _assert_same_weights(one_process, two)
    # rank 0 alone wrote, and every write was whole (no temporary file left)
    assert not [p for p in two.rglob(".*")]


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(corpus, one_process, tmp_path):
    out = tmp_path / "enc"
    run_worker(2, "pretrain", corpus_dir=str(corpus), out_dir=str(out), config=CONFIG,
               epochs=1, **OPTIONS)
    assert _log(out)["world_size_per_epoch"] == [2]
    pretrain(corpus, out, config=BrainLMConfig.tiny(**CONFIG), epochs=2, **OPTIONS)
    got = _log(out)
    assert got["world_size_per_epoch"] == [2, 1]
    np.testing.assert_allclose(got["loss_per_step"], _log(one_process)["loss_per_step"],
                               rtol=1e-5)
    _assert_same_weights(one_process, out)


@pytest.mark.slow
def test_cli_pretrain_under_torchrun_prints_once_and_resumes_alone(corpus, tmp_path):
    out = tmp_path / "enc"
    args = ["pretrain", str(corpus), "--out", str(out), "--config", "tiny", "--atlas", "aal3",
            "--batch-size", "4", "--regions-per-step", "12"]
    run = torchrun(2, "-m", "fmmtc_core.cli", *args, "--epochs", "1")
    assert run.stdout.count("wrote the pretrained encoder") == 1  # rank 0 alone prints
    assert main([*args, "--epochs", "2"]) == 0  # the same command, one process: resumes
    assert _log(out)["world_size_per_epoch"] == [2, 1]


def test_a_checkpoint_of_another_run_is_refused(corpus, tmp_path):
    out = tmp_path / "enc"
    opts = OPTIONS | dict(regions_per_step=8)
    pretrain(corpus, out, config=BrainLMConfig.tiny(**CONFIG), epochs=1, **opts)
    with pytest.raises(InvalidInputError, match=r"belongs to another pretraining run: it was "
                                                r"lr=0.001, now lr=0.002"):
        pretrain(corpus, out, config=BrainLMConfig.tiny(**CONFIG), epochs=2, **opts | {"lr": 2e-3})
    with pytest.raises(InvalidInputError, match="the encoder configuration differs"):
        pretrain(corpus, out, config=BrainLMConfig.tiny(**CONFIG | {"hidden_size": 32}),
                 epochs=2, **opts)
    state = out / "checkpoint" / "trainer_state.json"
    state.write_text("{")
    with pytest.raises(InvalidInputError, match="is not JSON .* delete"):
        pretrain(corpus, out, config=BrainLMConfig.tiny(**CONFIG), epochs=2, **opts)
    # a checkpoint written before the run's settings were recorded, with other weights
    state.write_text(json.dumps({"epoch": 1, "history": [1.0], "optimizer_scalars": {}}))
    with pytest.raises(InvalidInputError, match="does not fit this encoder configuration"):
        pretrain(corpus, out, config=BrainLMConfig.tiny(**CONFIG | {"hidden_size": 32}),
                 epochs=2, **opts)


def _torchrun_env(monkeypatch, world: int, local: int | None = None) -> None:
    for key, value in dict(WORLD_SIZE=world, RANK=0, LOCAL_RANK=0,
                           LOCAL_WORLD_SIZE=world if local is None else local,
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=1).items():
        monkeypatch.setenv(key, str(value))


def test_a_batch_that_does_not_split_over_the_processes_is_refused(corpus, tmp_path,
                                                                   monkeypatch):
    _torchrun_env(monkeypatch, 2)
    with pytest.raises(InvalidInputError, match=r"batch size \(3\) is the global batch, "
                                                r"split evenly over the 2 processes"):
        pretrain(corpus, tmp_path / "x", config=BrainLMConfig.tiny(**CONFIG),
                 **OPTIONS | {"batch_size": 3})
    assert not (tmp_path / "x").exists()


def test_threads_that_oversubscribe_the_cores_are_refused(corpus, tmp_path, monkeypatch):
    _torchrun_env(monkeypatch, 2)
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(InvalidInputError, match=rf"--threads {cores} with 2 processes on this "
                                                rf"machine asks for {2 * cores} threads"):
        pretrain(corpus, tmp_path / "x", config=BrainLMConfig.tiny(**CONFIG),
                 **OPTIONS | {"threads": cores})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_nccl_without_cuda_is_refused(corpus, tmp_path):
    with pytest.raises(InvalidInputError, match="NCCL backend was requested but no CUDA GPU"):
        pretrain(corpus, tmp_path / "x", config=BrainLMConfig.tiny(**CONFIG), backend="nccl",
                 **OPTIONS)
