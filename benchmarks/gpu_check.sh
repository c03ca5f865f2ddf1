#!/usr/bin/env bash
# The one prepared GPU check (under 10 minutes on one H100/H200): the tests marked `gpu`, the
# distillation and evaluation benchmarks at paper settings (MTT's iteration too: CIFAR shape, IPC 50,
# width 128, 30 student steps on all 500 images; its peak memory is the figure to read), and one DM cell
# on real CMNIST-DD at bias ratio 0.95 with the paper's IPC 50 and as many iterations as fit. Figures go
# to $OUT as JSON.
#
#     OUT=/tmp/gpu_out bash benchmarks/gpu_check.sh
#
# Needs python3 with torch, numpy, h5py, pyyaml, tqdm, matplotlib, scipy (no DVC): it runs from the
# source tree (PYTHONPATH=src). Each step has its own time limit, so one slow step cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1 BIASDD_WORKERS=8 MPLBACKEND=Agg
log() { echo "== $(date +%T) $*"; }

log "card"
python3 - <<'PY' | tee "$OUT/card.json"
import json, torch
print(json.dumps({"card": torch.cuda.get_device_name(0), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30}))
PY

log "tests marked gpu (limit 120 s)"
timeout 120 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml"

log "distillation, paper settings: DM, DC, DSA on the MNIST shape (limit 170 s)"
timeout 170 python3 benchmarks/distill_speed.py --device cuda --shapes mnist --iterations 2 --warmup 1 \
    --json "$OUT/distill_speed.json"

log "MTT, paper settings: one iteration on the CIFAR shape, IPC 50, width 128, 30 steps (limit 120 s)"
timeout 120 python3 benchmarks/distill_speed.py --device cuda --methods mtt --shapes cifar --iterations 2 \
    --warmup 1 --json "$OUT/mtt_speed.json"

log "evaluation, paper settings: 3 networks x 200 epochs on 500 images, full set 1 epoch (limit 60 s)"
timeout 60 python3 benchmarks/eval_speed.py --device cuda --epochs 200 --full-epochs 1 --json "$OUT/eval_speed.json"

log "one DM cell on real CMNIST-DD, rho 0.95 (limit 240 s)"
work=/tmp/biasdd_gpu_data
mkdir -p "$work"
python3 - <<'PY' > "$work/params.yaml"
import yaml
params = yaml.safe_load(open("params.yaml"))
params.update(dataset="cmnist", bias_ratio=0.95, severity=4)
print(yaml.safe_dump(params))
PY
timeout 240 bash -c "
  python3 stages/download.py --params $work/params.yaml --embedded data/embedded --out $work/base.h5 &&
  python3 stages/bias_inject.py --params $work/params.yaml --base $work/base.h5 --out $work/biased.h5 &&
  python3 benchmarks/gpu_dm_cell.py --data $work/biased.h5 --seconds 120 --out $OUT/dm_cell.json"
log "done; figures in $OUT"
ls -l "$OUT"
