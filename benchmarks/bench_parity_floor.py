"""How far fp32 results may honestly differ: the measurements behind verify's floor rule.

For each architecture (random weights, BN calibrated, as `export` makes them) and a few
seeded inputs, measures the largest |difference| in logits between
- eager fp32 and a float64 forward of the same model (fp32's own rounding), and
- ONNX Runtime's CPU provider and eager fp32 (what `verify` compares).

    python benchmarks/bench_parity_floor.py --out benchmarks/results/parity-floor.md
"""

from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path

import numpy as np

from pipeline.models.weights import load_model
from pipeline.options import FLOOR_MULTIPLE, SCALE_TERM

ARCHS = ("resnet18", "resnet50", "resnet101", "resnet152", "resnet152_cifar", "resnet101v2", "resnet152v2")


def ort_session(model, size: int):
    import onnxruntime as ort
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, size, size),), buffer, dynamo=False,
                          input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])


def floor_for(arch: str, seeds: int) -> dict[str, float]:
    import torch

    loaded = load_model(arch)
    model, size = loaded.model, loaded.preprocessing.crop
    session = ort_session(model, size)
    worst = {"fp32_vs_fp64": 0.0, "ort_vs_eager": 0.0, "logit_scale": 0.0}
    for seed in range(seeds):
        x = np.random.default_rng(100 + seed).standard_normal((3, 3, size, size), dtype=np.float32)
        with torch.no_grad():
            eager = model(torch.from_numpy(x)).numpy()
            exact = model.double()(torch.from_numpy(x).double()).numpy()
            model.float()
        ort_out = session.run(None, {"input": x})[0]
        worst["fp32_vs_fp64"] = max(worst["fp32_vs_fp64"], float(np.abs(eager - exact).max()))
        worst["ort_vs_eager"] = max(worst["ort_vs_eager"], float(np.abs(ort_out - eager).max()))
        worst["logit_scale"] = max(worst["logit_scale"], float(np.abs(eager).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parity-floor.md"))
    args = parser.parse_args()
    lines = ["# fp32 parity floor behind `verify`'s defaults", "",
             f"Command: `python benchmarks/bench_parity_floor.py --seeds {args.seeds}`", "",
             f"Random weights with calibrated BN, default input size, {args.seeds} seeded batches of 3; "
             f"ONNX via the legacy exporter (same graph as dynamo for these nets). verify's rule: "
             f"|candidate - fp64| <= {FLOOR_MULTIPLE:g} x floor + {SCALE_TERM:g} x max|logit|, "
             f"the floor being max|fp32 - fp64| measured on the spot.", "",
             "| arch | max abs(fp32 - fp64) | max abs(ORT - eager) | max abs logit | tolerance |",
             "|---|---|---|---|---|"]
    for arch in ARCHS:
        worst = floor_for(arch, args.seeds)
        lines.append(f"| {arch} | {worst['fp32_vs_fp64']:.2e} | {worst['ort_vs_eager']:.2e} | "
                     f"{worst['logit_scale']:.2f} | "
                     f"{FLOOR_MULTIPLE * worst['fp32_vs_fp64'] + SCALE_TERM * worst['logit_scale']:.2e} |")
        print(lines[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
