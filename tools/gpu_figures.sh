#!/usr/bin/env bash
# The GPU figures not yet measured (docs/sharding.md, "GPU figures"), in one run of a few minutes
# on one node with any number of GPUs; nothing is downloaded. Prints each figure with the date and
# the GPU; its files go to OUT (default /tmp/gpu_figures).
#
#   bash tools/gpu_figures.sh 2>&1 | tee gpu_figures.txt
#
#  1. benchmark.py --shape qwen2_5_vl_3b: one device, then FSDP2 over every GPU (per device)
#  2. train.py on preset:vit-large (ViT-L/16), bf16: images/s and MFU
#  3. host syncs per step of train.py (torch.cuda.set_sync_debug_mode): 40 steps against 20
#  4. ViT-B/16 bf16, same batch: train.py's images/s against a plain loop over timm's model
#     (skipped where timm is not installed)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/gpu_figures}
NGPU=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
(( NGPU > 0 )) || { echo "error: no GPU (nvidia-smi lists none)" >&2; exit 1; }
mkdir -p "$OUT"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
echo "date: $(date -u +%Y-%m-%d) GPUs: $NGPU x $GPU"
export OMP_NUM_THREADS=8

echo "== 1. Qwen2.5-VL-3B shape: one step (bf16, activation checkpointing)"
python tools/benchmark.py --shape qwen2_5_vl_3b --batch_size 8 --steps 10
torchrun --standalone --nproc_per_node "$NGPU" tools/benchmark.py --shape qwen2_5_vl_3b \
    --batch_size 8 --steps 10 --fsdp

[[ -f "$OUT/demo/datasets.json" ]] || python dataset.py --make-demo "$OUT/demo"
DATA=(--train_jsonl "$OUT/demo/digits/train.jsonl" "$OUT/demo/faces/train.jsonl"
      --datasets "$OUT/demo/datasets.json" --skip_evaluation --overwrite --logging_steps 10
      --precision bf16 --param_dtype bf16 --warmup_steps 0)
images_per_second() {  # the last logged samples_per_second of a run
    python -c "import json, sys; print(round([json.loads(l) for l in open(sys.argv[1])
        if '\"train\"' in l][-1]['samples_per_second'], 1))" "$1/metrics.jsonl"
}

echo "== 2. train.py, preset:vit-large (ViT-L/16, 304M parameters), bf16, batch 128"
python train.py --model preset:vit-large "${DATA[@]}" --batch_size 128 --max_steps 40 \
    --output_dir "$OUT/vit_large" > "$OUT/vit_large.log" 2>&1
RATE=$(images_per_second "$OUT/vit_large")
PEAK=$(python -c "import torch; n = torch.cuda.get_device_name(); print(next((v for k, v in
    {'H100': 989.0, 'H200': 989.0, 'A100': 312.0}.items() if k in n), 0))")
# model FLOPs per image: 6 x parameters x 197 tokens (attention excluded), as benchmark.py counts
python -c "r, p = $RATE, $PEAK; f = 6 * 304.4e6 * 197 * r / 1e12
print(f'{r} images/s, {f:.0f} model TFLOP/s' + (f', MFU {100 * f / p:.1f}%' if p else ''))"

echo "== 3. host syncs per step (train.py, ViT-L/16, logging every 10 steps)"
for STEPS in 20 40; do
    python - "$STEPS" "$OUT/syncs_$STEPS" "${DATA[@]}" --model preset:vit-large --batch_size 32 \
        > "$OUT/syncs_$STEPS.log" 2>&1 <<'EOF'
import sys
import warnings

import torch

import train

steps, out, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
count = [0]
warnings.simplefilter("always")
warnings.showwarning = lambda message, *a, **k: count.__setitem__(
    0, count[0] + ("synchroniz" in str(message)))
torch.cuda.set_sync_debug_mode("warn")
train.main(flags + ["--max_steps", steps, "--output_dir", out])
print(f"syncs {count[0]}")
EOF
done
A=$(grep -o 'syncs [0-9]*' "$OUT/syncs_20.log" | cut -d' ' -f2)
B=$(grep -o 'syncs [0-9]*' "$OUT/syncs_40.log" | cut -d' ' -f2)
python -c "print(f'{($B - $A) / 20:.2f} host syncs per step ({$A} in 20 steps, {$B} in 40)')"

echo "== 4. ViT-B/16 bf16, batch 128: train.py against a plain loop over timm's model"
python -c "
from transformers import ViTConfig, ViTImageProcessorPil, ViTModel
ViTModel(ViTConfig()).save_pretrained('$OUT/vit_base')  # ViT-B/16 at 224 px, random init
ViTImageProcessorPil(size={'height': 224, 'width': 224}, image_mean=[0.5] * 3,
                     image_std=[0.5] * 3).save_pretrained('$OUT/vit_base')"
python train.py --model "$OUT/vit_base" "${DATA[@]}" --batch_size 128 --max_steps 40 \
    --output_dir "$OUT/vit_base_run" > "$OUT/vit_base_run.log" 2>&1
echo "train.py: $(images_per_second "$OUT/vit_base_run") images/s"
if python -c "import timm" 2> /dev/null; then
    python - <<'EOF'
import time

import timm
import torch

model = timm.create_model("vit_base_patch16_224", num_classes=12).cuda().train()
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
images = torch.randn(128, 3, 224, 224, device="cuda")
labels = torch.randint(0, 12, (128,), device="cuda")
for i in range(50):
    if i == 10:
        torch.cuda.synchronize()
        start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
torch.cuda.synchronize()
print(f"timm, plain loop (no data loading): {40 * 128 / (time.perf_counter() - start):.1f} "
      "images/s")
EOF
else
    echo "timm is not installed here: the timm comparison is skipped"
fi
