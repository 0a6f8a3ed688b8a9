"""The margin of verify's fp32 rule, per arch and input size: no false failure, and what drift it catches.

For each arch and size (random weights, BN calibrated, as `export` makes them) and a seeded
batch of 3, with verify's own rule (``pipeline.stages.verify.compare_to_floor``):

- the model's fp32 noise floor, max |eager fp32 - eager fp64|, and the tolerance it earns;
- the error against fp64 of ONNX Runtime CPU, OpenVINO f32 and TorchScript, and the margin
  tolerance / error (> 1 passes: the "no false failure" column is the smallest margin);
- the smallest drift caught: the final layer's bias scaled by (1 +- d), alternating signs, for
  d on a ladder from 1e-5 to 1e-1 (applied to ORT's logits as the bias enters them: linearly);
  and whether the old fixed rule (atol 2e-3, rtol 1e-3) would have caught that drift.

    python benchmarks/bench_parity_margin.py --out benchmarks/results/parity-margin.md
"""

from __future__ import annotations

import argparse
import gc
import io
import time
import warnings
from pathlib import Path

import numpy as np

from pipeline.core.machine import cpu_summary
from pipeline.models.archs import ARCHS
from pipeline.models.weights import load_model
from pipeline.options import FLOOR_MULTIPLE, SCALE_TERM
from pipeline.stages.verify import compare, compare_to_floor

LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
OLD_ATOL, OLD_RTOL = 2e-3, 1e-3


def candidates(model, size: int):
    import onnxruntime as ort
    import openvino as ov
    import torch

    buffer = io.BytesIO()
    example = torch.randn(2, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), buffer, dynamo=False, input_names=["input"],
                          dynamic_axes={"input": {0: "batch"}})
        scripted = torch.jit.freeze(torch.jit.trace(model, example))
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    core = ov.Core()
    compiled = core.compile_model(core.read_model(buffer.getvalue(), b""), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    with torch.no_grad():
        return {"ort": lambda x: session.run(None, {"input": x})[0],
                "openvino": lambda x: compiled({0: x})[0],
                "torchscript": lambda x: scripted(torch.from_numpy(x)).numpy()}


def measure(arch: str, size: int) -> dict:
    import copy

    import torch

    model = load_model(arch, input_size=size).model.eval()
    x = np.random.default_rng(7).standard_normal((3, 3, size, size), dtype=np.float32)
    with torch.inference_mode():
        fp32 = model(torch.from_numpy(x)).numpy()
        exact = copy.deepcopy(model).double()
        fp64 = exact(torch.from_numpy(x).double()).numpy()
        del exact
    runs = {name: run(x) for name, run in candidates(model, size).items()}
    outcomes = {name: compare_to_floor(out, fp32, fp64) for name, out in runs.items()}
    bias = model.fc.bias.detach().numpy().astype(np.float64)
    signs = np.where(np.arange(bias.size) % 2 == 0, 1.0, -1.0)
    caught = None
    for d in LADDER:
        drifted = runs["ort"] + (bias * d * signs)[None, :]
        if not compare_to_floor(drifted, fp32, fp64).passed:
            change = float(np.abs(bias * d).max())
            old = compare(drifted, fp32, atol=OLD_ATOL, rtol=OLD_RTOL).passed
            caught = {"d": d, "logit_change": change, "old_rule_caught": not old}
            break
    floor = outcomes["ort"].fp32_floor
    del model, runs
    gc.collect()
    return {"floor": floor, "tolerance": outcomes["ort"].tolerance,
            "errors": {k: v.max_abs_vs_fp64 for k, v in outcomes.items()},
            "margin": min(v.margin for v in outcomes.values()),
            "passed": all(v.passed for v in outcomes.values()), "caught": caught}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64,224")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/parity-margin.md"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    lines = ["# verify's fp32 rule: margin over the noise floor, and the smallest drift caught", "",
             f"Command: `python benchmarks/bench_parity_margin.py --sizes {args.sizes}`", "",
             f"CPU: {cpu_summary()}", "",
             f"Rule: |candidate - fp64| <= {FLOOR_MULTIPLE:g} x floor + {SCALE_TERM:g} x max|fp64|, "
             f"floor = max|eager fp32 - eager fp64| on the same batch of 3. Random weights, BN "
             f"calibrated. Drift: final bias x (1 +- d), alternating signs; ladder "
             f"{', '.join(f'{d:g}' for d in LADDER)}.", "",
             "| arch | px | fp32 floor | tolerance | ORT err | OpenVINO err | TorchScript err | "
             "smallest margin (no false failure > 1) | smallest d caught | its logit change | "
             "change / floor | old atol 2e-3 caught it |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    started = time.time()
    for arch in args.archs.split(","):
        for size in map(int, args.sizes.split(",")):
            r = measure(arch, size)
            c = r["caught"]
            caught = (f"{c['d']:g} | {c['logit_change']:.1e} | {c['logit_change'] / r['floor']:.0f}x | "
                      f"{'yes' if c['old_rule_caught'] else 'no'}") if c else "none | | |"
            lines.append(f"| {arch} | {size} | {r['floor']:.1e} | {r['tolerance']:.1e} | "
                         f"{r['errors']['ort']:.1e} | {r['errors']['openvino']:.1e} | "
                         f"{r['errors']['torchscript']:.1e} | {r['margin']:.1f}"
                         f"{'' if r['passed'] else ' FALSE FAILURE'} | {caught} |")
            print(lines[-1], flush=True)
    lines += ["", f"Took {time.time() - started:.0f} s."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
