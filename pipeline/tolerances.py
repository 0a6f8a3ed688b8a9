"""Parity and accuracy-gate defaults for ``verify`` (kept free of numpy so ``--help`` stays light).

fp32 parity: the tolerance is a property of the model being checked, not a constant measured
on one machine. At verify time eager PyTorch runs the same input in float64 as well; the
model's own fp32 noise floor on that input is ``floor = max |eager fp32 - eager fp64|``. A
candidate passes when, element-wise,

    |candidate - eager fp64| <= FLOOR_MULTIPLE * floor + SCALE_TERM * max |eager fp64|

An export that computes the same function lands within about one floor of float64 (ONNX
Runtime, OpenVINO and TorchScript on all 13 archs at 32, 64 and 224 px: at most 1.8 floors,
benchmarks/results/parity-margin.md), so 8 floors leave a margin of 4 or more while a drift
a few floors large fails. Each machine measures its own floor, so the rule moves with the CPU.
The scale term keeps a model whose floor happens to be tiny from demanding more than
fp32 can promise relative to its logits. ``--atol``/``--rtol`` replace the rule with numpy's
``allclose`` against eager fp32.

Reduced precision (int8, fp16, bf16, OpenVINO's own choice) is not an allclose question: it is
gated on predictions, against eager fp32 on evaluation images.
"""

FLOOR_MULTIPLE = 8.0
SCALE_TERM = 1e-5

# The accuracy gate for reduced-precision candidates.
DEFAULT_MAX_TOP1_DROP = 1.0  # points of top-1 accuracy, when the images carry labels
DEFAULT_MIN_AGREEMENT = 0.99  # share of images whose top-1 class equals eager fp32's
