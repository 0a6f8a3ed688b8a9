#!/usr/bin/env bash
# Every GPU check in one command, sized for < 8 minutes on an H100:
#   1. install what the GPU rows need: the project with its tensorrt extra (TensorRT 10 for
#      CUDA 13, what onnxruntime-gpu's TensorRT provider links), from the index, or offline
#      from wheels in .whl/ (the device machine reaches no index; see README, "GPU checks");
#   2. python -m pytest -m gpu;
#   3. export resnet50, quantize (fp16 and int8), verify with the CUDA pairs and gates;
#   4. bench every CUDA and TensorRT row at batch 1, 8 and 32, ORT CPU fp32 beside them;
#   5. write benchmarks/results/backends-gpu.md naming the GPU (and copy it to $OUT if set).
#
#   bash benchmarks/gpu_check.sh
#
# TF32 is off twice: torch's flags in the runners, and NVIDIA_TF32_OVERRIDE=0 here, because
# cuDNN's frontend ignores use_tf32. Each batch size has its own warm-up (cuDNN's algorithm
# search and TensorRT profiles are per shape); TensorRT engines are cached per model sha256
# and library versions, and the engine build shows as cold start, apart from latency.
set -uo pipefail
cd "$(dirname "$0")/.."
export NVIDIA_TF32_OVERRIDE=0 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_DIR:-/tmp/gpu-check}
RESULT=benchmarks/results/backends-gpu.md
ARCH=${GPU_CHECK_ARCH:-resnet50}
status=0
step() { echo; echo "== $*"; }

step "install"
if ! "$PY" -m pip install -q -e ".[dev,tensorrt]" 2>/dev/null; then
  if [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --find-links .whl -e ".[dev,tensorrt]" \
      || "$PY" -m pip install -q --no-index --find-links .whl --no-deps --no-build-isolation -e . \
      || status=1
  else
    echo "no package index and no .whl/: using what is installed" >&2
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=$PWD
  fi
fi
"$PY" - <<'PY'
import importlib.metadata as m
for name in ("torch", "onnxruntime-gpu", "onnxruntime", "onnxsim", "openvino", "tensorrt-cu13", "tensorrt-cu13-libs"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name}: not installed")
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || status=1

step "pytest -m gpu"
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/ || status=1

step "export, quantize, verify ($ARCH)"
rm -rf "$WORK" && mkdir -p "$WORK"
simplify=""
"$PY" -c "import onnxsim" 2>/dev/null || simplify="--no-simplify"
timeout 240 "$PY" -m pipeline export --arch "$ARCH" --out "$WORK/b" $simplify || status=1
timeout 180 "$PY" -m pipeline quantize "$WORK/b" --calibration synthetic --count 200 || status=1
timeout 240 "$PY" -m pipeline verify "$WORK/b" || status=1

step "bench"
timeout 420 "$PY" -m pipeline bench "$WORK/b" \
  --backends ort-cpu:fp32,torch-cuda,torchscript-cuda,ort-cuda,ort-cuda-iobinding,ort-tensorrt \
  --batch-sizes 1,8,32 --iterations 200 --seconds 2 || status=1

step "write $RESULT"
if [ -f "$WORK/b/report.md" ]; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  { echo "# GPU backends on ${gpu:-an unknown GPU}"; echo
    echo "Command: \`bash benchmarks/gpu_check.sh\` ($(date -u +%Y-%m-%d))"; echo
    echo "Verify on the same machine: see parity.json in the bundle; its gate lines are below."; echo
    "$PY" -m pipeline verify "$WORK/b" 2>&1 | sed 's/^/    /'
    echo; sed '1d' "$WORK/b/report.md"; } > "$RESULT"
  [ -n "${OUT:-}" ] && cp "$RESULT" "$WORK/b/latency.json" "$WORK/b/parity.json" "$OUT/" 2>/dev/null
  echo "wrote $RESULT"
else
  echo "no report: bench did not run" >&2; status=1
fi
exit $status
