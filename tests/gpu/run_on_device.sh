#!/usr/bin/env bash
# Everything that needs a GPU, in one command, for a session lent one (the `run` device tool
# runs it in a copy of this repository; its image has torch, safetensors, numpy and pytest):
#
#     bash tests/gpu/run_on_device.sh            # logs in $OUT (device tool) or ./gpu-out
#
# 1. tests/gpu: V1 on CUDA == V1 on CPU, V2 on CUDA == V1 in every mode, the resident cache,
#    a caller on a non-default stream. 2. benchmarks/v2_speed.py --device cuda: the README's
#    GPU rows (V1/V2 wall time per mode, peak RSS, peak VRAM).
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
# The copy's folder is not named lora_extract: import the package through a link that is.
mkdir -p /tmp/pack && ln -sfn "$(pwd)" /tmp/pack/lora_extract
export PYTHONPATH=/tmp/pack${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/device.txt"
python3 -m pytest tests/gpu -q -p no:cacheprovider -rs 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
python3 benchmarks/v2_speed.py --device cuda 2>&1 | tee "$out/v2_speed_cuda.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc, benchmark rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
