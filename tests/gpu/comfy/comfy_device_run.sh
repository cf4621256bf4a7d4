#!/usr/bin/env bash
# The pack's nodes inside the real ComfyUI 0.3.64 runtime (in-process, no server) on a GPU machine.
# Run from the pack checkout's root, with .carry-comfy/ (made by tests/gpu/comfy/prep_comfy_carry.sh
# from a ComfyUI checkout; git-ignored) copied along when the GPU machine has no ComfyUI:
#     bash tests/gpu/comfy/comfy_device_run.sh
# Steps: carried wheels -> /tmp/site (if any); PYTHONPATH = ComfyUI subset + pack link (lora_extract);
# the tiny model pairs regenerated into /tmp/tiny_models (4 seeded generators in parallel, skipped when
# the files there already have the expected content digests); comfy_inprocess.py --device cuda.
# Results under $OUT (4 files): comfy_device.log (everything, tee'd), comfy_inprocess.log (detailed,
# tracebacks, ComfyUI's log), comfy_inprocess.json (per tensor), models.log. About 1-2 minutes.
# Env: OUT (/tmp/comfy-out)  DEVICE (cuda)  MODELS_DIR (/tmp/tiny_models)  GEN_S (60)  HARNESS_S (170): caps, worst case under 4 minutes
#      HARNESS_ARGS (extra arguments for comfy_inprocess.py)
set -uo pipefail
R=$(pwd); C=${CARRY_DIR:-$R/.carry-comfy}; H=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd); PACK=${PACK_DIR:-$R}
OUT=${OUT:-/tmp/comfy-out}; mkdir -p "$OUT"
DEVICE=${DEVICE:-cuda}; MODELS=${MODELS_DIR:-/tmp/tiny_models}
L=$OUT/comfy_device.log
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
T0=$(date +%s)
el() { echo "$(( $(date +%s) - T0 ))s"; }

main() {
echo "== start $(date -u +%T) cwd=$R device=$DEVICE"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
for d in "$C/comfyui" "$C/models" "$PACK"; do
  [[ -d $d ]] || { echo "ERROR: $d missing (run from the pack checkout; make .carry-comfy with tests/gpu/comfy/prep_comfy_carry.sh)"; return 2; }
done
cat "$C/MANIFEST.txt" 2>/dev/null

# 1. carried wheels
if compgen -G "$C/wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$C"/wheels/*.whl \
    && export PYTHONPATH=/tmp/site && echo "wheels installed: $(ls "$C/wheels" | tr '\n' ' ')" \
    || echo "WARNING: wheel install failed"
else
  echo "no wheels carried (none needed)"
fi

# 2. ComfyUI source subset + the pack as lora_extract
mkdir -p /tmp/packlink && ln -sfn "$PACK" /tmp/packlink/lora_extract
export PYTHONPATH=$C/comfyui:/tmp/packlink${PYTHONPATH:+:$PYTHONPATH}
echo "PYTHONPATH=$PYTHONPATH"

# 3. tiny models (736 MB: regenerated, not carried)
if python3 "$H/comfy_inprocess.py" --print-digests "$MODELS" 2>/dev/null | cmp -s - "$C/models/expected_digests.json"; then
  echo "models: $MODELS already has the expected files"
else
  mkdir -p "$MODELS"; rm -f "$OUT/models.log"
  nthr=$(( $(nproc) / 4 )); (( nthr < 1 )) && nthr=1
  pids=()
  for a in sd15 sd3 flux_like wan21; do
    COMFYUI_ROOT=$C/comfyui OMP_NUM_THREADS=$nthr MKL_NUM_THREADS=$nthr timeout "${GEN_S:-60}" \
      python3 "$PACK/scripts/comfyui/make_tiny_models.py" --arch "$a" --out "$MODELS" >> "$OUT/models.log" 2>&1 &
    pids+=($!)
  done
  rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  echo "models generated rc=$rc at $(el): $(grep -o '"arch": "[a-z0-9_]*"\|"detect_ok": [a-z]*\|"secs": [0-9.]*' "$OUT/models.log" | tr '\n' ' ')"
fi

# 4. the harness
rm -rf /tmp/comfy-work
timeout "${HARNESS_S:-170}" python3 "$H/comfy_inprocess.py" --device "$DEVICE" --comfy-root "$C/comfyui" \
  --models-dir "$MODELS" --pack "$PACK" --work /tmp/comfy-work \
  --log "$OUT/comfy_inprocess.log" --json "$OUT/comfy_inprocess.json" \
  --expect-digests "$C/models/expected_digests.json" ${HARNESS_ARGS:-}
rc=$?
[[ $rc == 124 ]] && echo "TIMEOUT: harness killed after ${HARNESS_S:-170}s (stacks and partial results in comfy_inprocess.log/json)"
echo "== end $(date -u +%T) harness rc=$rc total $(el)"
return $rc
}

main 2>&1 | tee -a "$L"
exit "${PIPESTATUS[0]}"
