"""Benchmark: whole-scan embedding time and peak memory of each BrainLM layout on this machine.

Run: ``python bench/bench_foundation.py [--sizes 13m 111m 650m] [--volumes 150] [--tr 2.0]``

For each size a checkpoint with random weights is written in the *published* layout to a
temporary folder (deleted afterwards; the speed does not depend on the values):

- ``13m``: legacy ``brainlm_mae`` (hidden 512 x 4 layers, the size brainmarks reports for
  ``old_13M``; 424 regions, 200-sample windows, exact attention), ``token_order="shuffle"`` with
  the default number of seeded shuffles (each one is a forward pass);
- ``111m``: ViT-MAE, 16-pixel patches, 768 x 12 (``vitmae_111M``);
- ``650m``: ViT-MAE, 14-pixel patches, 1280 x 32 (``vitmae_650M``).

Each size is measured in its own process (so peak memory is that size's alone): load the folder
with :func:`fmmtc_core.models.registry.load_encoder` (weights checked and loaded), fit the robust
scaling on one random scan, and embed one simulated scan of ``--volumes`` at ``--tr`` (resampled
to 0.735 s: 150 volumes at 2 s give 408 samples = 2 windows) with
:meth:`~fmmtc_core.models.encoder_base.FoundationEncoder.embed_scan`. Peak memory is the
process's maximum resident set (``ru_maxrss``), which includes Python and torch (the first row
says how much that is). The device is the one ``load_encoder`` picks (CUDA + bf16 when present).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SIZES = {
    "13m": {"family": "legacy", "hidden": 512, "layers": 4, "heads": 8, "inter": 2048},
    "111m": {"family": "vitmae", "patch": 16, "hidden": 768, "layers": 12, "heads": 12,
             "inter": 3072, "dec": (512, 8, 16, 2048)},
    "650m": {"family": "vitmae", "patch": 14, "hidden": 1280, "layers": 32, "heads": 16,
             "inter": 5120, "dec": (512, 8, 16, 2048)},
}


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


def _write_coordinates(path: Path) -> None:
    import numpy as np

    xyz = np.random.default_rng(0).integers(-35, 36, size=(424, 3)) * 2
    path.write_text("".join(f"{i}\t{x}\t{y}\t{z}\n" for i, (x, y, z) in enumerate(xyz, 1)))


def create(size: str, folder: Path) -> None:
    """Write a random checkpoint of ``size`` in its published layout (names of transformers 4)."""
    import torch
    from safetensors.torch import save_file

    spec = SIZES[size]
    folder.mkdir(parents=True)
    _write_coordinates(folder / "A424_Coordinates.dat")
    g = torch.Generator().manual_seed(0)
    if spec["family"] == "legacy":
        from fmmtc_core.models.foundation import BrainLMConfig, BrainLMForPretraining

        cfg = BrainLMConfig(hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                            num_attention_heads=spec["heads"], intermediate_size=spec["inter"],
                            decoder_hidden_size=spec["hidden"], decoder_num_hidden_layers=2,
                            decoder_num_attention_heads=spec["heads"],
                            decoder_intermediate_size=spec["inter"])
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in BrainLMForPretraining(cfg).state_dict().items()}
        raw = {k: v for k, v in cfg.to_dict().items() if k not in ("attention_mode",
                                                                   "token_order", "xyz_scale")}
        raw |= {"model_type": "brainlm_mae", "architectures": ["BrainLMForPretraining"]}
    else:
        from transformers import ViTMAEConfig, ViTMAEForPreTraining

        side = {16: 432, 14: 434}[spec["patch"]]
        dh, dl, dheads, dinter = spec["dec"]
        cfg = ViTMAEConfig(hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                           num_attention_heads=spec["heads"], intermediate_size=spec["inter"],
                           image_size=side, patch_size=spec["patch"], decoder_hidden_size=dh,
                           decoder_num_hidden_layers=dl, decoder_num_attention_heads=dheads,
                           decoder_intermediate_size=dinter)
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in ViTMAEForPreTraining(cfg).state_dict().items()}
        raw = cfg.to_dict() | {"model_type": "vit_mae", "architectures": ["ViTMAEForPreTraining"]}
    state = {}
    for k, shape in shapes.items():
        name = (k.replace("vit.layers.", "vit.encoder.layer.")
                .replace("attention.q_proj", "attention.attention.query")
                .replace("attention.k_proj", "attention.attention.key")
                .replace("attention.v_proj", "attention.attention.value")
                .replace("attention.o_proj", "attention.output.dense")
                .replace("mlp.fc1", "intermediate.dense").replace("mlp.fc2", "output.dense"))
        state[name] = torch.randn(shape, generator=g) * 0.02
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(raw))


def measure(folder: Path, volumes: int, tr: float) -> dict:
    """Load, fit the scaling, embed one scan: times and peak memory of this process."""
    import numpy as np
    import torch

    base = _peak_gb()
    from fmmtc_core.models.registry import load_encoder

    torch_base = _peak_gb()
    t0 = time.perf_counter()
    enc = load_encoder(folder)
    t_load = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    scan = rng.standard_normal((volumes, 424)).astype(np.float32)
    enc.fit_scaling([scan])
    plan = enc.plan(volumes, tr)
    t0 = time.perf_counter()
    emb = enc.embed_scan(scan, tr)
    t_scan = time.perf_counter() - t0
    e = enc.entry
    tokens = (e.image_size[0] // e.patch[0]) ** 2 if e.image_size else e.n_regions * (
        e.window // e.patch[1])
    return {"entry": e.name, "parameters": enc.n_parameters, "hidden": e.hidden_size,
            "tokens": tokens + 1, "shuffles": e.order_samples if e.token_order == "shuffle"
            else 1, "windows": plan.n_windows, "load_s": t_load, "scan_s": t_scan,
            "window_s": t_scan / plan.n_windows, "peak_gb": _peak_gb(),
            "python_torch_gb": torch_base, "python_gb": base, "device": str(enc.device),
            "precision": enc.precision, "finite": bool(np.isfinite(emb).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--volumes", type=int, default=150)
    parser.add_argument("--tr", type=float, default=2.0)
    parser.add_argument("--_create", nargs=2, metavar=("SIZE", "DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--_measure", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._create:
        create(args._create[0], Path(args._create[1]))
        return
    if args._measure:
        print(json.dumps(measure(Path(args._measure), args.volumes, args.tr)))
        return

    import torch

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="fmmtc-bench-foundation-"))
    env = os.environ | {"FMMTC_CACHE_DIR": str(tmp / "cache")}  # never touch a real cache
    try:
        for size in args.sizes:
            folder = tmp / size
            subprocess.run([sys.executable, __file__, "--_create", size, str(folder)],
                           check=True, env=env)
            disk = (folder / "model.safetensors").stat().st_size / 1024**3
            out = subprocess.run([sys.executable, __file__, "--_measure", str(folder),
                                  "--volumes", str(args.volumes), "--tr", str(args.tr)],
                                 check=True, env=env, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1]) | {"size": size, "disk_gb": disk}
            rows.append(row)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cpu = platform.processor() or platform.machine()
    print(f"Whole-scan embedding, one scan of {args.volumes} volumes at TR {args.tr:g} s "
          f"(resampled to 0.735 s), device {rows[0]['device']} ({rows[0]['precision']}), "
          f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}\n")
    print("| layout | encoder parameters | hidden | tokens / window | forwards / window | "
          "windows | load (s) | per window (s) | per scan (s) | peak memory (GB) | "
          "checkpoint on disk (GB) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['entry']} ({r['size']}) | {r['parameters'] / 1e6:.1f} M | {r['hidden']} | "
              f"{r['tokens']} | {r['shuffles']} | {r['windows']} | {r['load_s']:.1f} | "
              f"{r['window_s']:.1f} | {r['scan_s']:.1f} | {r['peak_gb']:.2f} | "
              f"{r['disk_gb']:.2f} |")
    print(f"\nPeak memory includes Python + torch + transformers "
          f"({rows[0]['python_torch_gb']:.2f} GB before any model is loaded).")
    if not all(r["finite"] for r in rows):
        print("WARNING: a non-finite embedding", file=sys.stderr)


if __name__ == "__main__":
    main()
