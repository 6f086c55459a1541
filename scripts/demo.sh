#!/usr/bin/env bash
# Set everything up and run the main job end to end on the generated demo data:
# MAE (the ViT-L recipe, --smoke sized) with 2 DeepSpeed ranks, checkpoints, a timm-ready export and PNGs.
#   NUM_RANKS=1 bash scripts/demo.sh     # on a machine with one GPU
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # one ninja (the venv's) for DeepSpeed's JIT ops
RUN=${RUN:-runs/demo}
NUM_RANKS=${NUM_RANKS:-2}
rm -rf "$RUN"
.venv/bin/deepspeed --num_gpus "$NUM_RANKS" recipes/mae_vitl.py --ds_config zero2.json --smoke \
  --output_dir "$RUN" --max_steps 40
.venv/bin/mimscale export --checkpoint "$RUN" --output "$RUN/encoder.safetensors" --encoder-only
.venv/bin/python - "$RUN/encoder.safetensors" <<'PY'
import sys, torch
from mimscale.export import load_timm_encoder
model = load_timm_encoder(sys.argv[1])
feats = model.forward_features(torch.randn(2, 3, *model.patch_embed.img_size))
print(f"[demo] timm loaded {sys.argv[1]} strict: {type(model).__name__}, features {tuple(feats.shape)}")
PY
echo "[demo] run directory: $RUN (metrics.jsonl, loss.png, reconstructions.png, tensorboard/, checkpoints/)"
