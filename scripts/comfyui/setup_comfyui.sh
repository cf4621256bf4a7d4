#!/usr/bin/env bash
# Install / start / stop a real, headless ComfyUI (CPU) with this pack, for the integration and
# browser tests (see CONTRIBUTING.md). Run from anywhere; the pack is this checkout.
#
#   setup_comfyui.sh install [SOURCE]  # ComfyUI checkout + venv + torch + requirements (idempotent)
#   setup_comfyui.sh models            # the tiny real-architecture model pairs the tests use
#   setup_comfyui.sh start             # background server on 127.0.0.1:$COMFY_PORT, with this pack
#   setup_comfyui.sh stop              # stop only the pid in the pid file
#   setup_comfyui.sh restart | status
#   setup_comfyui.sh all [SOURCE]      # install + models + start
#
# SOURCE: ComfyUI's git URL (default https://github.com/comfyanonymous/ComfyUI.git) or a local git
# directory (a clone or a bare mirror); $COMFY_SOURCE when omitted. COMFY_REF picks the tag,
# branch or commit (default v0.3.64, the version the tests are written against).
#
# Env: COMFYUI_ROOT ($HOME/comfyui)  COMFY_VENV ($HOME/comfyvenv)  COMFY_STATE ($HOME/comfyui-run:
#      pid, server.log, extra_model_paths.yaml, custom_nodes/)  COMFY_PORT (8188)  COMFY_REF (v0.3.64)
#      COMFY_EXTRA_ARGS ("")  COMFY_START_TIMEOUT (240)  TORCH_SPEC ("torch==2.14.1 torchvision==0.29.1")
#      COMFY_CUSTOM_NODES_DIR (default $COMFY_STATE/custom_nodes, holding a link to this checkout;
#      a folder whose sub-folders are node packs, added via extra_model_paths.yaml 'custom_nodes:')
#      COMFY_TORCHAUDIO (auto: only when comfy.sd needs it | always | never)  TORCHAUDIO_SPEC (torchaudio)
set -euo pipefail

COMFYUI_ROOT=${COMFYUI_ROOT:-$HOME/comfyui}
COMFY_VENV=${COMFY_VENV:-$HOME/comfyvenv}
COMFY_STATE=${COMFY_STATE:-$HOME/comfyui-run}
COMFY_PORT=${COMFY_PORT:-8188}
COMFY_HOST=127.0.0.1                      # loopback only, never anything else
COMFY_REF=${COMFY_REF:-v0.3.64}
COMFY_SOURCE=${COMFY_SOURCE:-https://github.com/comfyanonymous/ComfyUI.git}
COMFY_START_TIMEOUT=${COMFY_START_TIMEOUT:-240}
# ComfyUI hard-imports torchvision (comfy/sd.py -> ldm/cascade/stage_c_coder.py): a matching
# torch/torchvision pair is installed into ComfyUI's own venv (the pack's tests use their own).
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PACK=$(cd "$HERE/../.." && pwd)   # this checkout: the pack ComfyUI loads
PIDFILE=$COMFY_STATE/server.pid
LOG=$COMFY_STATE/server.log
URL="http://$COMFY_HOST:$COMFY_PORT"

say() { echo "[setup_comfyui $(date +%T)] $*"; }
now() { date +%s.%N; }
dt() { python3 -c "print(f'{$(now)-$1:.1f}')"; }
pip_q() {  # quiet pip that still fails loudly
  local log; log=$(mktemp)
  if ! "$COMFY_VENV/bin/pip" install "$@" > "$log" 2>&1; then
    grep -v "is ignored: it is neither" "$log" | tail -30 >&2; rm -f "$log"; echo "pip install $* failed" >&2; exit 1
  fi
  grep -v "is ignored: it is neither" "$log" | grep -E "^(Successfully|ERROR|WARNING)" || true; rm -f "$log"
}

do_checkout() {
  local src=${1:-$COMFY_SOURCE} rev t0
  t0=$(now)
  if [[ -d "$src" ]] && git --git-dir="$src" rev-parse --git-dir >/dev/null 2>&1 \
      || [[ -d "$src/.git" ]]; then
    local gd=$src; [[ -d "$src/.git" ]] && gd=$src/.git
    rev=$(git --git-dir="$gd" rev-parse "$COMFY_REF^{commit}")
    if [[ -f "$COMFYUI_ROOT/COMFYUI_COMMIT.txt" && "$(cat "$COMFYUI_ROOT/COMFYUI_COMMIT.txt")" == "$rev" ]]; then
      say "checkout: $COMFYUI_ROOT already at $rev"; return
    fi
    mkdir -p "$COMFYUI_ROOT"
    # Written with read-tree + checkout-index rather than a clone, so a partial mirror (a few
    # large blobs absent) still gives every file it has.
    local idx missing; idx=$(mktemp)
    GIT_DIR=$gd GIT_INDEX_FILE=$idx git read-tree "$rev"
    missing=$(git --git-dir="$gd" ls-tree -r "$rev" | awk '$2=="blob"{print $3" "$4}' |
              while read -r h p; do git --git-dir="$gd" cat-file -e "$h" 2>/dev/null || echo "$p"; done)
    if [[ -n "$missing" ]]; then
      say "checkout: blobs absent from $src, skipped: $(echo "$missing" | tr '\n' ' ')"
      echo "$missing" | while read -r p; do GIT_DIR=$gd GIT_INDEX_FILE=$idx git rm -q --cached -- "$p"; done
    fi
    GIT_DIR=$gd GIT_INDEX_FILE=$idx git checkout-index -a -f --prefix="$COMFYUI_ROOT/"
    rm -f "$idx"
  else
    # A URL: a shallow fetch of the one ref into a fresh folder.
    if [[ -f "$COMFYUI_ROOT/COMFYUI_COMMIT.txt" ]]; then
      say "checkout: $COMFYUI_ROOT exists (at $(cat "$COMFYUI_ROOT/COMFYUI_COMMIT.txt")); remove it to check out again"; return
    fi
    mkdir -p "$COMFYUI_ROOT"
    git -C "$COMFYUI_ROOT" init -q
    git -C "$COMFYUI_ROOT" fetch -q --depth 1 "$src" "$COMFY_REF"
    git -C "$COMFYUI_ROOT" checkout -q FETCH_HEAD
    rev=$(git -C "$COMFYUI_ROOT" rev-parse HEAD)
  fi
  echo "$rev" > "$COMFYUI_ROOT/COMFYUI_COMMIT.txt"
  say "checkout: $COMFY_REF ($rev) from $src -> $COMFYUI_ROOT in $(dt "$t0")s"
}

do_venv() {
  local t0; t0=$(now)
  [[ -x "$COMFY_VENV/bin/python" ]] || python3 -m venv "$COMFY_VENV"
  local pins; pins=$(mktemp)
  for s in $TORCH_SPEC; do echo "$s" >> "$pins"; done
  if ! "$COMFY_VENV/bin/python" - "$TORCH_SPEC" <<'EOF' 2>/dev/null
import sys, importlib.metadata as md
want = dict(s.split("==") for s in sys.argv[1].split())
ok = all(md.version(k).split("+")[0] == v for k, v in want.items())
import torch, torchvision  # must import, not just be installed
sys.exit(0 if ok else 1)
EOF
  then
    say "venv: installing $TORCH_SPEC (runs on the CPU: ComfyUI starts with --cpu)"
    # shellcheck disable=SC2086
    pip_q $TORCH_SPEC
  fi
  local req; req=$(mktemp)
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$' "$COMFYUI_ROOT/requirements.txt" > "$req"
  # 'requests' is imported by app/frontend_management.py but not listed (transformers>=5 no longer pulls it)
  echo "requests" >> "$req"
  say "venv: pip install ComfyUI requirements (torch pinned by constraint; torchaudio skipped; no-op when satisfied)"
  pip_q -c "$pins" -r "$req"
  do_torchaudio "$pins"
  "$COMFY_VENV/bin/python" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  rm -f "$req" "$pins"
  say "venv: ready in $(dt "$t0")s ($(du -sh "$COMFY_VENV" | cut -f1))"
}

# torchaudio: PyPI has no torchaudio built for torch 2.14.x, so requirements.txt's 'torchaudio' is
# skipped above. ComfyUI 0.3.x runs without it, but newer ComfyUI (seen: 0.33.0) imports it
# unconditionally from comfy/sd.py (comfy/ldm/lightricks/vae/audio_vae.py), so nothing loads.
# COMFY_TORCHAUDIO=auto (default): install TORCHAUDIO_SPEC only when 'import comfy.sd' fails for
# want of torchaudio (a venv for 0.3.x stays as it was); always | never force it.  Under the torch
# pins pip picks torchaudio 2.11.0, whose wheel declares no torch requirement (abi3, stable-ABI
# extensions) and imports beside torch 2.14.1.
comfy_sd_import_error() {  # prints the last stderr line when 'import comfy.sd' fails, nothing when it imports
  local out
  out=$(cd "$COMFYUI_ROOT" && "$COMFY_VENV/bin/python" -B -c \
        "import comfy.cli_args; comfy.cli_args.args.cpu = True; import comfy.sd" 2>&1 >/dev/null) || echo "$out" | tail -1
}

do_torchaudio() {
  local pins=$1 mode=${COMFY_TORCHAUDIO:-auto} err=""
  if "$COMFY_VENV/bin/python" -c "import torchaudio" 2>/dev/null; then return; fi
  case "$mode" in
    never) return ;;
    always) ;;
    auto) err=$(comfy_sd_import_error)
          [[ "$err" == *"No module named 'torchaudio'"* ]] || return 0 ;;
    *) echo "COMFY_TORCHAUDIO must be auto, always or never (got '$mode')" >&2; exit 1 ;;
  esac
  say "venv: this ComfyUI needs torchaudio (${err:-COMFY_TORCHAUDIO=always}); installing ${TORCHAUDIO_SPEC:-torchaudio} under the torch pins"
  # shellcheck disable=SC2086
  pip_q -c "$pins" ${TORCHAUDIO_SPEC:-torchaudio}
  "$COMFY_VENV/bin/python" -c "import torch, torchaudio; print('torchaudio', torchaudio.__version__, 'beside torch', torch.__version__)"
  err=$(comfy_sd_import_error)
  [[ -z "$err" ]] || say "venv: WARNING: 'import comfy.sd' still fails: $err"
}

write_extra_paths() {
  mkdir -p "$COMFY_STATE" "$COMFYUI_ROOT/output/loras" "$COMFYUI_ROOT/output/diffusion_models"
  if [[ -z "${COMFY_CUSTOM_NODES_DIR:-}" ]]; then
    COMFY_CUSTOM_NODES_DIR=$COMFY_STATE/custom_nodes
    mkdir -p "$COMFY_CUSTOM_NODES_DIR"
    ln -sfn "$PACK" "$COMFY_CUSTOM_NODES_DIR/ComfyUI-LoRA-Extract"
  fi
  # LoraSave writes to output/loras, ModelSave to output/diffusion_models: expose both
  # to the loaders (LoraLoaderModelOnly, UNETLoader) so a saved file can be loaded back.
  {
    echo "test_outputs:"
    echo "    base_path: $COMFYUI_ROOT/output"
    echo "    loras: loras"
    echo "    diffusion_models: diffusion_models"
    if [[ -n "${COMFY_CUSTOM_NODES_DIR:-}" ]]; then
      echo "test_custom_nodes:"
      echo "    base_path: $COMFY_CUSTOM_NODES_DIR"
      echo "    custom_nodes: ."
    fi
  } > "$COMFY_STATE/extra_model_paths.yaml"
}

is_running() {
  [[ -f "$PIDFILE" ]] || return 1
  local pid; pid=$(cat "$PIDFILE")
  kill -0 "$pid" 2>/dev/null && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "main.py"
}

do_start() {
  if is_running; then say "start: already running, pid $(cat "$PIDFILE")"; return; fi
  if curl -sf -o /dev/null "$URL/object_info" 2>/dev/null; then
    echo "something else already answers on $URL; stop it first" >&2; exit 1
  fi
  write_extra_paths
  local t0; t0=$(now)
  echo "==== start $(date -Is) ====" >> "$LOG"
  cd "$COMFYUI_ROOT"
  # shellcheck disable=SC2086
  setsid "$COMFY_VENV/bin/python" main.py --cpu --listen "$COMFY_HOST" --port "$COMFY_PORT" \
      --extra-model-paths-config "$COMFY_STATE/extra_model_paths.yaml" ${COMFY_EXTRA_ARGS:-} \
      >> "$LOG" 2>&1 < /dev/null &
  echo $! > "$PIDFILE"
  cd - >/dev/null
  local pid; pid=$(cat "$PIDFILE")
  local end=$(( $(date +%s) + COMFY_START_TIMEOUT ))
  until curl -sf -o /dev/null "$URL/object_info"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "ComfyUI exited during start; log tail:" >&2; tail -40 "$LOG" >&2; rm -f "$PIDFILE"; exit 1
    fi
    if (( $(date +%s) > end )); then echo "ComfyUI not answering after ${COMFY_START_TIMEOUT}s" >&2; tail -40 "$LOG" >&2; exit 1; fi
    sleep 0.5
  done
  local rss; rss=$(ps -o rss= -p "$pid" | tr -d ' ')
  say "start: pid $pid answering $URL/object_info after $(dt "$t0")s, RSS $((rss / 1024)) MiB, log $LOG"
}

do_stop() {
  if ! [[ -f "$PIDFILE" ]]; then say "stop: no pid file"; return; fi
  local pid; pid=$(cat "$PIDFILE")
  if is_running; then
    kill -TERM "$pid"
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    say "stop: pid $pid stopped"
  else
    say "stop: pid $pid was not running"
  fi
  rm -f "$PIDFILE"
}

do_status() {
  if is_running; then
    local pid; pid=$(cat "$PIDFILE")
    say "running pid $pid, RSS $(( $(ps -o rss= -p "$pid") / 1024 )) MiB, $(curl -s -o /dev/null -w '%{http_code}' "$URL/system_stats") from /system_stats"
  else
    say "not running"; return 1
  fi
}

do_models() {
  local t0; t0=$(now)
  COMFYUI_ROOT=$COMFYUI_ROOT "$COMFY_VENV/bin/python" "$HERE/make_tiny_models.py" "$@"
  # SD1.5 UNet + real-shape CLIP-L checkpoints for the text-encoder tests
  COMFYUI_ROOT=$COMFYUI_ROOT "$COMFY_VENV/bin/python" "$PACK/scripts/make_tiny_sd15_clip.py" \
      --models "$COMFYUI_ROOT/models"
  say "models: done in $(dt "$t0")s"
}

cmd=${1:-all}; shift || true
case "$cmd" in
  install) do_checkout "${1:-}"; do_venv ;;
  models) do_models "$@" ;;
  start) do_start ;;
  stop) do_stop ;;
  restart) do_stop; do_start ;;
  status) do_status ;;
  all) do_checkout "${1:-}"; do_venv
       if (( $(ls "$COMFYUI_ROOT"/models/diffusion_models/tiny_*_tuned.safetensors 2>/dev/null | wc -l) < 4 )); then do_models; fi
       do_start ;;
  *) echo "usage: $0 install [SOURCE]|models [args]|start|stop|restart|status|all [SOURCE]" >&2; exit 2 ;;
esac
