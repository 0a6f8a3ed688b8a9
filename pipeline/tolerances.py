"""Default parity tolerances for ``verify`` (kept free of numpy so ``--help`` stays light).

Defaults, atol 2e-3 and rtol 1e-3, come from measurement, not habit. Eager fp32 is itself not
exact: against a float64 forward of the same random-weight model and input it is off by up to
8.8e-4 on resnet152 (4e-5 on resnet50, 2.3e-4 on resnet101, under 5e-5 on the pre-activation
nets), and ONNX Runtime lands up to 1.2e-3 from eager on resnet152, with logits of scale ~2
(benchmarks/bench_parity_floor.py). The absolute term alone leaves a 1.7x margin above the
worst of those, while a corrupted weight, a wrong layout or a preprocessing slip moves logits
by 1e-2 or more.
"""

DEFAULT_ATOL = 2e-3
DEFAULT_RTOL = 1e-3
