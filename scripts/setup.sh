#!/usr/bin/env bash
# Create .venv and install mimscale with everything it needs. Idempotent: a second run only checks.
#
# torch/torchvision are pinned to the CUDA builds cluster users get (they also run on CPU). They are
# installed first because DeepSpeed's source build imports torch (hence --no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PIP_FLAGS=(--quiet --disable-pip-version-check)

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
torch_pin=$(grep -E '^torch==' requirements.txt)
vision_pin=$(grep -E '^torchvision==' requirements.txt)
echo "[setup] installing $torch_pin $vision_pin"
"$PY" -m pip install "${PIP_FLAGS[@]}" "$torch_pin" "$vision_pin"
echo "[setup] installing requirements.txt and requirements-dev.txt"
"$PY" -m pip install "${PIP_FLAGS[@]}" --no-build-isolation -r requirements.txt -r requirements-dev.txt
echo "[setup] installing mimscale (editable)"
"$PY" -m pip install "${PIP_FLAGS[@]}" --no-build-isolation --no-deps -e .
"$PY" -c "from mimscale.data.transforms import REGION_DECODE as r; \
print(f'[setup] crop-region JPEG decoding: {r}' if r else '[setup] WARNING: the crop-region JPEG decoder \
was not built (libjpeg-turbo headers missing: apt install libjpeg62-turbo-dev / libjpeg-turbo8-dev, \
dnf install libjpeg-turbo-devel), so images are decoded whole (~20% slower); rerun this script after.')"
"$PY" -c "import torch, torchvision, timm, deepspeed, webdataset, mimscale; \
print(f'[setup] ok: torch {torch.__version__}, timm {timm.__version__}, deepspeed {deepspeed.__version__}, \
mimscale {mimscale.__version__}')" 2>&1 | grep -v "real_accelerator"
