#!/usr/bin/env bash
# Everything that needs a GPU, in one command of under 10 minutes (TOTAL_S). From the pack
# checkout's root on the GPU machine; for the comfy part, .carry-comfy/ filled first with
# tests/gpu/comfy/prep_comfy_carry.sh (see CONTRIBUTING.md, "On a GPU"):
#
#     bash tests/gpu/run_on_device.sh
#     plumbing check on a CPU machine (same parts, small sizes, nothing needs CUDA):
#         DEVICE=cpu MODELS_DIR=~/comfyui/models/diffusion_models bash tests/gpu/run_on_device.sh
#
# Parts, in order, each time-boxed (and cut to what is left of TOTAL_S), the next one run even if
# one fails:
#   info      nvidia-smi, torch and CUDA versions
#   tests     pytest tests/gpu (CUDA V1 == CPU V1, V2 == V1 in every mode, resident cache, streams)
#   comfy     the nodes inside the real ComfyUI runtime (tests/gpu/comfy/comfy_device_run.sh:
#             ComfyUI's loaders, LoraExtract and LoraExtractV2, LoraLoaderModelOnly, per-tensor
#             comparison, V1 vs V2 files) on 4 tiny real architectures
#   peers     benchmarks/gpu_peers.py: full SVD per layer (ComfyUI LoraSave / KJ svd_linalg), KJ's
#             default svd_lowrank(q=rank, niter=7), ours svd_lowrank and svd_linalg, one run
#   v2speed   benchmarks/v2_speed.py: V1 vs V2 per VRAM mode
# Output in $OUT or ./gpu-out: one log per part, gpu_tests.xml (junit),
# gpu_peers.json, comfy_*.log/json, summary.json (per part: status, rc, seconds, log, last
# lines) and on stdout one line per part and a final "RUN_ON_DEVICE SUMMARY ..." line.
# Exit status: 0 when every part passed, 1 otherwise.
# Env: DEVICE (cuda; cpu = plumbing check)  TOTAL_S (540)  <PART>_S (caps, below)
#      MODELS_DIR (comfy harness models; default: regenerated into /tmp/tiny_models)
#      V2_ARGS, PEERS_ARGS (extra arguments)  PARTS ("info tests comfy peers v2speed")
set -uo pipefail
ROOT=$(pwd)
OUT_DIR=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT_DIR"
DEVICE=${DEVICE:-cuda}
TOTAL_S=${TOTAL_S:-540}
PARTS=${PARTS:-info tests comfy peers v2speed}
T0=$(date +%s)
export ROOT OUT_DIR DEVICE

# The copy's folder is not named lora_extract: import the package through a link that is.
LINK=$(mktemp -d)
ln -sfn "$ROOT" "$LINK/lora_extract"
export PYTHONPATH=$LINK${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [[ $DEVICE == cpu ]]; then
  # Plumbing check: the same parts at sizes a small CPU machine runs in a few minutes.
  V2_ARGS=${V2_ARGS:---modes balanced}
  PEERS_ARGS=${PEERS_ARGS:---quick}
fi

RESULTS=$OUT_DIR/.parts.tsv
: > "$RESULTS"

# run_part NAME CAP_SECONDS LOGFILE COMMAND...: time-boxed, logged, recorded; never aborts the script.
run_part() {
  local name=$1 cap=$2 log=$3; shift 3
  local left=$(( TOTAL_S - ($(date +%s) - T0) ))
  local t=$(( cap < left ? cap : left ))
  if (( t < 10 )); then
    echo "[$name] skipped: ${left}s left of TOTAL_S=${TOTAL_S}" | tee "$log"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" skipped "" 0 "$log" >> "$RESULTS"
    return 0
  fi
  echo "[$name] start (limit ${t}s): $*"
  local s=$(date +%s)
  if declare -F "$1" > /dev/null; then
    # A shell function: run it in a child bash so that timeout can stop it and its children.
    timeout -k 10 "$t" bash -c "$(declare -f "$1"); $*" > "$log" 2>&1
  else
    timeout -k 10 "$t" "$@" > "$log" 2>&1
  fi
  local rc=$? secs=$(( $(date +%s) - s )) status=ok
  if (( rc == 124 || rc == 137 )); then status=timeout; elif (( rc != 0 )); then status=fail; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$log" >> "$RESULTS"
  tail -n "${TAIL_LINES:-6}" "$log" | sed "s/^/[$name] /"
  echo "[$name] $status rc=$rc in ${secs}s (log: $log)"
}

part_info() {
  command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); sys.exit(0 if torch.cuda.is_available() or '$DEVICE' == 'cpu' else 3)"
}

part_tests() {
  python3 -m pytest tests/gpu -q -p no:cacheprovider -rs --junitxml="$OUT_DIR/gpu_tests.xml"
  local rc=$?
  # 5: nothing collected. Without CUDA (plumbing check) every test skips, which is rc 0.
  return $rc
}

part_comfy() {
  local h=$ROOT/tests/gpu/comfy/comfy_device_run.sh
  if [[ ! -d $ROOT/.carry-comfy/comfyui ]]; then
    echo "no .carry-comfy/comfyui: fill it first (bash tests/gpu/comfy/prep_comfy_carry.sh, on a machine with a ComfyUI checkout)"
    return 2
  fi
  # The harness's own caps (model generation, harness) stay under this part's limit.
  OUT=$OUT_DIR DEVICE=$DEVICE GEN_S=${GEN_S:-60} HARNESS_S=${HARNESS_S:-170} bash "$h"
  local rc=$?
  grep -h "SUMMARY" "$OUT_DIR/comfy_device.log" 2>/dev/null | tail -1
  return $rc
}

for part in $PARTS; do
  case $part in
    info)    run_part info "${INFO_S:-30}" "$OUT_DIR/device.txt" part_info ;;
    tests)   run_part tests "${TESTS_S:-150}" "$OUT_DIR/gpu_tests.log" part_tests ;;
    comfy)   run_part comfy "${COMFY_S:-240}" "$OUT_DIR/comfy_part.log" part_comfy ;;
    peers)   run_part peers "${PEERS_S:-120}" "$OUT_DIR/gpu_peers.log" \
               python3 benchmarks/gpu_peers.py --device "$DEVICE" --json "$OUT_DIR/gpu_peers.json" ${PEERS_ARGS:-} ;;
    v2speed) run_part v2speed "${V2_S:-200}" "$OUT_DIR/v2_speed_$DEVICE.log" \
               python3 benchmarks/v2_speed.py --device "$DEVICE" ${V2_ARGS:-} ;;
    *)       echo "unknown part $part"; printf '%s\tfail\t2\t0\t-\n' "$part" >> "$RESULTS" ;;
  esac
done

python3 - "$RESULTS" "$OUT_DIR/summary.json" "$DEVICE" "$(( $(date +%s) - T0 ))" <<'PY'
import json, os, sys
rows, out, device, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
parts = []
for line in open(rows):
    name, status, rc, secs, log = line.rstrip("\n").split("\t")
    tail = []
    if os.path.isfile(log):
        tail = open(log, errors="replace").read().splitlines()[-15:]
    parts.append({"part": name, "status": status, "rc": int(rc) if rc else None,
                  "seconds": int(secs), "log": os.path.basename(log), "last_lines": tail})
ok = sum(p["status"] == "ok" for p in parts)
json.dump({"device": device, "seconds": total, "ok": ok, "parts": parts}, open(out, "w"), indent=1)
print(f"RUN_ON_DEVICE SUMMARY device={device} ok={ok}/{len(parts)} total={total}s "
      + " ".join(f"{p['part']}={p['status']}" for p in parts))
sys.exit(0 if ok == len(parts) else 1)
PY
rc=$?
rm -rf "$LINK" "$RESULTS"
exit $rc
