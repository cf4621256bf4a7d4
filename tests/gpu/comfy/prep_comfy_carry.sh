#!/usr/bin/env bash
# Fill .carry-comfy/ (ignored by git) for comfy_device_run.sh on a GPU machine that has torch but no
# ComfyUI: copy this folder to it along with the checkout. Needs a ComfyUI 0.3.64 checkout
# (scripts/comfyui/setup_comfyui.sh install makes one).
#   comfyui/   ComfyUI 0.3.64's Python source that in-process use needs: the comfy/ package (.py only:
#              no tokenizer/vocab data, no tests), folder_paths.py, node_helpers.py, cuda_malloc.py,
#              comfyui_version.py, COMFYUI_COMMIT.txt, LICENSE. Not nodes.py/server.py/comfy_api/
#              comfy_extras/app: they hard-import av/pydantic/... and are not needed in-process.
#   wheels/    cp312 manylinux wheels of modules the imports need that the GPU machine lacks, found by
#              importing in a venv that has only what the GPU machine has (PROBE_PY); may be empty.
#   models/    expected_digests.json: content digests of the local tiny models. The models themselves
#              (736 MB of fp16) are not copied: the GPU machine regenerates them, bit for bit, with
#              the same seeded scripts/comfyui/make_tiny_models.py, and the digests prove it.
#
#   bash tests/gpu/comfy/prep_comfy_carry.sh   # from the pack checkout's root; prints the size
# Env: COMFYUI_ROOT (~/comfyui)  COMFY_VENV (~/comfyvenv: python with torch+safetensors for digests)
#      PROBE_PY (unset: no probe; else the python of a venv with only the GPU machine's packages,
#      used to find which wheels the imports need there)  PROBE_EXTRA_IMPORTS (more modules to import in the probe)
#      CARRY_DIR (<repo>/.carry-comfy)  MAX_MIB (40)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=${PACK_DIR:-$PWD}   # the pack checkout: run this from its root
SRC=${COMFYUI_ROOT:-$HOME/comfyui}
DEST=${CARRY_DIR:-$REPO/.carry-comfy}
VENV_PY=${COMFY_VENV:-$HOME/comfyvenv}/bin/python
PROBE_PY=${PROBE_PY:-}
MAX_MIB=${MAX_MIB:-40}
say() { echo "[prep_comfy_carry] $*"; }

ver=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$SRC/comfyui_version.py")
[[ "$ver" == "0.3.64" ]] || { echo "expected ComfyUI 0.3.64 in $SRC, found '$ver'" >&2; exit 1; }

# git must ignore the carry folder
EXCL=$REPO/.git/info/exclude
if [[ -d $REPO/.git ]] && ! grep -qxF "/.carry-comfy/" "$EXCL" 2>/dev/null; then
  echo "/.carry-comfy/" >> "$EXCL"; say "added /.carry-comfy/ to $EXCL"
fi

rm -rf "$DEST"
mkdir -p "$DEST/comfyui" "$DEST/wheels" "$DEST/models"

# 1. ComfyUI source subset
( cd "$SRC" && find comfy -name '*.py' ! -path '*/__pycache__/*' -print0 | xargs -0 cp --parents -t "$DEST/comfyui" )
for f in folder_paths.py node_helpers.py cuda_malloc.py comfyui_version.py COMFYUI_COMMIT.txt LICENSE; do
  [[ -f "$SRC/$f" ]] && cp "$SRC/$f" "$DEST/comfyui/"
done
say "comfyui: $(find "$DEST/comfyui" -type f | wc -l) files, $(du -sh "$DEST/comfyui" | cut -f1)"

# 2. probe the imports with only the GPU machine's packages; download wheels for what is missing
declare -A PIPNAME=( [torchsde]=torchsde [trampoline]=trampoline [av]=av [spandrel]=spandrel
  [kornia]=kornia [kornia_rs]=kornia-rs [alembic]=alembic [sqlalchemy]=SQLAlchemy [pydantic]=pydantic
  [pydantic_core]=pydantic-core [pydantic_settings]=pydantic-settings [yarl]=yarl [mako]=Mako
  [typing_inspection]=typing-inspection [annotated_types]=annotated-types [dotenv]=python-dotenv )
pin() {  # the version ComfyUI's own venv runs, if it has the package
  local v; v=$("$VENV_PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true)
  [[ -n "$v" ]] && echo "$1==$v" || echo "$1"
}
PROBE_SITE=$(mktemp -d); LINK=$(mktemp -d)
ln -s "$REPO" "$LINK/lora_extract"
trap 'rm -rf "$PROBE_SITE" "$LINK"' EXIT
probe_code="
import sys
import comfy.options, comfy.cli_args
comfy.cli_args.args.cpu = True
import torch, folder_paths, comfy.model_management, comfy.sd, comfy.utils, comfy.lora, comfy.model_patcher
import comfy.lora_convert, comfy.float, comfy.supported_models, comfy.model_detection
import lora_extract, lora_extract.nodes, lora_extract.memory.streamed_extract, lora_extract.charts
import safetensors.torch
for m in '${PROBE_EXTRA_IMPORTS:-}'.split():
    __import__(m)
print('probe ok')
"
if [[ -n "$PROBE_PY" && -x "$PROBE_PY" ]]; then
  for i in $(seq 1 12); do
    out=$(PYTHONPATH="$DEST/comfyui:$LINK:$PROBE_SITE" "$PROBE_PY" -c "$probe_code" 2>&1) && { say "probe ($PROBE_PY): imports ok"; break; }
    mod=$(echo "$out" | sed -n "s/.*No module named '\([^'.]*\).*/\1/p" | tail -1)
    if [[ -z "$mod" ]]; then echo "$out" | tail -20 >&2; echo "probe failed, not on a missing module" >&2; exit 1; fi
    name=${PIPNAME[$mod]:-$mod}; spec=$(pin "$name")
    say "probe: missing module '$mod' -> wheel $spec"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$DEST/wheels" "$spec" 2>&1 | grep -v "is ignored" || true
    # the same package for the probe's own python (a cp312 binary wheel would not import on 3.11)
    "$PROBE_PY" -m pip install -q --no-deps --no-compile --target "$PROBE_SITE" "$spec" 2>&1 | grep -v "is ignored" || true
    [[ $i -lt 12 ]] || { echo "probe: too many missing modules" >&2; exit 1; }
  done
else
  say "no PROBE_PY: wheels/ left empty (the GPU machine must have what ComfyUI imports)"
fi
say "wheels: $(ls "$DEST/wheels" | wc -l) ($(ls "$DEST/wheels" | tr '\n' ' '))"

# 3. tiny models: generator + expected content digests
"$VENV_PY" "$HERE/comfy_inprocess.py" --print-digests "$SRC/models/diffusion_models" > "$DEST/models/expected_digests.json"
say "models: generator + digests of $(grep -c safetensors "$DEST/models/expected_digests.json") files ($(du -shc "$SRC"/models/diffusion_models/tiny_*.safetensors | tail -1 | cut -f1) locally: regenerated on the device)"

cat > "$DEST/MANIFEST.txt" <<EOF
made by tests/gpu/comfy/prep_comfy_carry.sh on $(date -u +%F\ %T) UTC
ComfyUI $ver $(cat "$SRC/COMFYUI_COMMIT.txt" 2>/dev/null) from $SRC (subset: comfy/**/*.py + top-level modules)
wheels: $(ls "$DEST/wheels" | tr '\n' ' ')
models: regenerate with: COMFYUI_ROOT=.carry-comfy/comfyui python3 scripts/comfyui/make_tiny_models.py --out DIR
EOF
bytes=$(du -sb "$DEST" | cut -f1)
mib=$(python3 -c "print(f'{$bytes/2**20:.2f}')")
say "TOTAL $DEST: $mib MiB ($bytes bytes, $(find "$DEST" -type f | wc -l) files)"
python3 -c "import sys; sys.exit(0 if $bytes <= $MAX_MIB*2**20 else 1)" || { echo "carry over ${MAX_MIB} MiB" >&2; exit 1; }
