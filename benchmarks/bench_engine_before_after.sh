#!/usr/bin/env bash
# predict's engine end to end (bench --scenario offline), this checkout against an earlier
# commit (default 5011f2d, the last with multiprocessing's spawn pool), alternating rounds in
# one run on the same bundle and folder. Prints one line per run:
#   side  end-to-end img/s  decode-only D  inference-only I  ratio to 1/(1/D+1/I)  split
# Usage: bash benchmarks/bench_engine_before_after.sh BUNDLE FOLDER [COMMIT] [ROUNDS]
# (bench_offline.py --work DIR leaves a trained bundle in DIR/r18-224 and photos in DIR/photos/all)
set -euo pipefail
bundle=$(realpath "$1"); folder=$(realpath "$2"); commit=${3:-5011f2d}; rounds=${4:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
old=$(mktemp -d)/before
git -C "$here" worktree add -f "$old" "$commit" -q
trap 'git -C "$here" worktree remove --force "$old"' EXIT
for round in $(seq "$rounds"); do
  for side in before now; do
    src=$([ "$side" = before ] && echo "$old" || echo "$here")
    (cd /tmp && PYTHONPATH="$src" python -m pipeline bench "$bundle" --scenario offline \
        --images "$folder" --backends ort-cpu:int8 --seconds 3 --json 2>/dev/null) |
      python -c "import json,sys; d=json.load(sys.stdin); print('$side', round(d['end_to_end_per_s'],1), round(d['decode_only_per_s'],1), round(d['infer_only_per_s'],1), round(d['ratio_to_bound'],3), d['split'], sep=' | ')"
  done
done
