#!/usr/bin/env bash
# Every GPU check, for a GPU machine (H100: under 10 minutes in all):
#   install   the project, with onnxruntime-gpu and the tensorrt extra from the index; offline,
#             from wheels in .whl/ or a wheel split into parts in $GPU_CHECK_PARTS (see README,
#             "GPU checks"); a CPU-only onnxruntime found there is removed first (the two wheels
#             overwrite each other);
#   test      python -m pytest -m gpu;
#   export    resnet50 with --aoti (model.pt2, AOTInductor for the CPU and CUDA);
#   quantize  int8 (200 synthetic calibration images) and fp16;
#   verify    the CUDA pairs (ORT, torch.export, AOTInductor) and the CUDA/TensorRT gates;
#   bench     every CUDA and TensorRT row at batch 1, 8 and 32, ORT CPU fp32 beside them;
#   write     benchmarks/results/backends-gpu.md naming the GPU (copied to $OUT if set);
#   probe     (only when named) loads aoti-cuda in fresh processes, alone and after another
#             backend, to narrow down its SIGSEGV there (backends-gpu.md).
#
#   bash benchmarks/gpu_check.sh                         # every step
#   GPU_CHECK_STEPS=install,test bash benchmarks/gpu_check.sh
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
STEPS=",${GPU_CHECK_STEPS:-install,test,export,quantize,verify,bench,write},"
PARTS=${GPU_CHECK_PARTS:-/tmp/parts}
status=0
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }
want() { [[ $STEPS == *",$1,"* ]]; }
save() { [ -n "${OUT:-}" ] && cp "$@" "$OUT/" 2>/dev/null; return 0; }

if want install; then
  step "install"
  if ls "$PARTS"/*.part00 >/dev/null 2>&1; then  # a wheel too large to carry whole
    for first in "$PARTS"/*.part00; do
      wheel="$PARTS/$(basename "$first" .part00)"
      cat "${first%00}"?? > "$wheel" && rm -f "${first%00}"??
    done
  fi
  shopt -s nullglob
  wheels=("$PARTS"/*.whl .whl/*.whl)
  shopt -u nullglob
  if [ ${#wheels[@]} -gt 0 ]; then
    for wheel in "${wheels[@]}"; do
      if [[ $(basename "$wheel") == onnxruntime_gpu-* ]]; then
        "$PY" -m pip uninstall -y onnxruntime || true  # the CPU wheel would shadow it
      fi
    done
    "$PY" -m pip install --no-index --no-deps "${wheels[@]}" || status=1
  fi
  if ! "$PY" -m pip install -q --retries 0 --timeout 5 -e ".[dev,tensorrt]" 2>/dev/null; then
    echo "no package index: installing the project without its dependencies" >&2
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || export PYTHONPATH=$PWD
  fi
  "$PY" - <<'PY'
import importlib.metadata as m
for name in ("torch", "onnxruntime-gpu", "onnxruntime", "onnx", "onnxsim", "openvino", "tensorrt-cu13"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name}: not installed")
import onnxruntime as ort
print("onnxruntime providers:", ort.get_available_providers())
PY
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || status=1
fi

if want test; then
  step "pytest -m gpu"
  timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee /tmp/gpu-pytest.log
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  save /tmp/gpu-pytest.log
fi

simplify=""
"$PY" -c "import onnxsim" 2>/dev/null || simplify="--no-simplify"
if want export; then
  step "export $ARCH --aoti"
  rm -rf "$WORK" && mkdir -p "$WORK"
  timeout 300 "$PY" -m pipeline export --arch "$ARCH" --out "$WORK/b" --aoti $simplify || status=1
  save "$WORK/b/manifest.json"
fi
if want quantize; then
  step "quantize"
  timeout 180 "$PY" -m pipeline quantize "$WORK/b" --calibration synthetic --count 200 || status=1
fi
if want verify; then
  step "verify"
  timeout 240 "$PY" -m pipeline verify "$WORK/b" > "$WORK/verify.txt" 2>&1 || status=1
  cat "$WORK/verify.txt"
  save "$WORK/b/parity.json" "$WORK/verify.txt"
fi
if want bench; then
  step "bench"
  # the label report --price looks the machine up by (report merges this file with CPU ones)
  label=${GPU_CHECK_LABEL:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9.\n' '-')}
  timeout 300 "$PY" -m pipeline bench "$WORK/b" --machine "${label:-gpu}" \
    --backends ort-cpu:fp32,torch-cuda,torchscript-cuda,torch-export-cuda,aoti-cuda,ort-cuda,ort-cuda-iobinding,ort-tensorrt \
    --batch-sizes 1,8,32 --iterations 100 --seconds 1 --warmup-seconds 0.5 || status=1
  save "$WORK/b/latency.json" "$WORK/b/report.md"
fi
if want probe; then  # not in the default steps: why aoti-cuda crashes in a fresh process
  step "probe aoti-cuda loading in fresh processes"
  for first in none aoti-cpu torch-export-cuda; do
    timeout 150 "$PY" -X faulthandler - "$WORK/b" "$first" <<'PY' 2>&1 | grep -v Warning | tail -4
import sys, time
from pathlib import Path
from pipeline.backends import get_backend
from pipeline.bundle import Bundle
bundle, first = Bundle.open(Path(sys.argv[1])), sys.argv[2]
if first != "none":
    get_backend(first).make(bundle, "fp32")
started = time.perf_counter()
runner = get_backend("aoti-cuda").make(bundle, "fp32")
print(f"after {first}: aoti-cuda loaded in {time.perf_counter() - started:.1f}s", flush=True)
PY
    echo "after $first: exit ${PIPESTATUS[0]}"
  done
fi
if want write; then
  step "write $RESULT"
  if [ -f "$WORK/b/report.md" ]; then
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
    { echo "# GPU backends on ${gpu:-an unknown GPU}"; echo
      echo "Command: \`bash benchmarks/gpu_check.sh\` ($(date -u +%Y-%m-%d)), $ARCH, 224 px, random weights."; echo
      echo "verify on the same machine (parity pairs and gates):"; echo
      sed 's/^/    /' "$WORK/verify.txt"
      echo; sed '1d' "$WORK/b/report.md"; } > "$RESULT"
    cp "$WORK/b/latency.json" benchmarks/results/latency-gpu.json  # for report --price
    save "$RESULT" benchmarks/results/latency-gpu.json
    echo "wrote $RESULT and benchmarks/results/latency-gpu.json"
  else
    echo "no report: bench did not run" >&2; status=1
  fi
fi
exit $status
