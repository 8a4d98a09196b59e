#!/usr/bin/env bash
# The GPU check (issue 12, item 7): on a machine with CUDA, in under 8 minutes on one H200:
#   1. the tests that need CUDA (tests/test_gpu.py: bf16 and 16-bit mixed precision, channels_last,
#      torch.compile with inductor, the feature cache on the device);
#   2. training throughput of tf_efficientnet_lite0 at 224 px in bf16: finetune.fit against a bare timm loop
#      (timm benchmark.py's train loop) on the same card;
#   3. a 2-device DDP fit, when two GPUs are present.
# Usage: bash benchmarks/gpu_check.sh [--cpu-dry-run]
#   --cpu-dry-run runs the same three steps on the CPU with tiny sizes (CI does, so the script cannot rot).
# Offline: needs the installed package (pip install -e ".[test]") and nothing from the network.
# Output: the log on stdout; the throughput numbers also in $GPU_CHECK_OUT/throughput.json (default: a temp folder).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" NO_ALBUMENTATIONS_UPDATE=1
DRY=()
if [[ "${1:-}" == "--cpu-dry-run" ]]; then
  DRY=(--cpu-dry-run)
  export FINETUNE_GPU_DRY_RUN=1 CUDA_VISIBLE_DEVICES=""
elif [[ -n "${1:-}" ]]; then
  echo "usage: bash benchmarks/gpu_check.sh [--cpu-dry-run]" >&2; exit 2
fi
OUT="${GPU_CHECK_OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
# a feature and weights cache of its own: the check never reads a stale one
export FINETUNE_HOME="$WORK/home"
step() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }
START=$SECONDS

step "environment"
python - <<'EOF'
import platform, torch, timm, pytorch_lightning as pl
n = torch.cuda.device_count()
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"timm {timm.__version__}, lightning {pl.__version__}")
print(f"{n} CUDA device(s): " + ", ".join(torch.cuda.get_device_name(i) for i in range(n)) if n else "no CUDA device")
EOF
if [[ ${#DRY[@]} -eq 0 ]] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device: run on a GPU machine, or with --cpu-dry-run" >&2; exit 2
fi

step "1. tests that need CUDA"
python -m pytest -q -p no:cacheprovider tests/test_gpu.py -rs

step "2. training throughput, bf16, 224 px"
python benchmarks/gpu_check.py throughput "${DRY[@]}" --json "$OUT/throughput.json"

step "3. DDP on 2 devices"
if [[ ${#DRY[@]} -gt 0 ]] || [[ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]]; then
  python benchmarks/gpu_check.py ddp "$WORK/ddp" "${DRY[@]}"
else
  echo "skipped: one CUDA device"
fi

echo; echo "gpu_check: all steps passed in $((SECONDS - START)) s${DRY:+ (CPU dry run)}"
