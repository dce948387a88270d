#!/usr/bin/env bash
# DRAFT (issue 6): retrain the demo tokenizer and the NBP / NTP demo transformers on a CPU.
#
# Every stage checkpoints (OUT/<stage>/checkpoint.pt) and continues where it
# stopped when the script is rerun (--resume starts fresh when there is no
# checkpoint). Step counts and learning rates are placeholders until the
# calibration runs fix them (see the model card).
#
#   OUT=runs/demo RES=32 bash scripts/train_demo.sh
#
# THREADS=1 matters on a shared CPU: oversubscribed OpenMP threads made a
# training step ~100x slower than one thread per process on the 2-core box.
set -euo pipefail

OUT=${OUT:-runs/demo}
RES=${RES:-32}                    # 32 -> latent 5x4x4 (80 codes), 64 -> 5x8x8 (320 codes)
CLIPS=${CLIPS:-20000}             # training clips: seeds 0 .. CLIPS-1 of data seed DATA_SEED
DATA_SEED=${DATA_SEED:-0}         # held-out clips for `nbp eval` use another data seed
TOK_STEPS=${TOK_STEPS:-3000}
LM_STEPS=${LM_STEPS:-3000}
THREADS=${THREADS:-1}
W=$((RES / 8))                    # latent width with the tiny tokenizer's 8x spatial factor

DATA=(--data synthetic --resolution "$RES" --num-frames 17 --num-clips "$CLIPS" --data-seed "$DATA_SEED")
COMMON=(--threads "$THREADS" --log-every 25 --ckpt-every 200 --resume)

# 1. Tokenizer: reconstruction (MSE), AdamW + warmup + cosine.
nbp train tokenizer --out "$OUT/tokenizer" "${DATA[@]}" --preset tiny --loss mse \
    --steps "$TOK_STEPS" --batch 8 --lr 2e-3 --warmup 100 --schedule cosine --min-lr-ratio 0.1 \
    "${COMMON[@]}"

# 2. Encode the training clips once.
if [ ! -f "$OUT/codes.safetensors" ]; then
    nbp train tokens --tokenizer "$OUT/tokenizer/model" --out "$OUT/codes.safetensors" "${DATA[@]}" \
        --threads "$THREADS"
fi

# 3. Two transformers of equal size and budget: NBP with row blocks (1 x 1 x W) and NTP.
#    Class-conditional (12 synthetic classes, begin-of-video layout) with 10% condition
#    dropout, so the same model serves class-conditional generation (with or without CFG)
#    and frame prediction.
for MODE in nbp ntp; do
    if [ "$MODE" = nbp ]; then BLOCK=(1 1 "$W"); else BLOCK=(1 1 1); fi
    nbp train transformer --out "$OUT/$MODE" --tokens "$OUT/codes.safetensors" \
        --preset tiny --n-layer 4 --n-head 4 --n-embd 256 --block-shape "${BLOCK[@]}" \
        --classes 12 --p-drop-cond 0.1 \
        --steps "$LM_STEPS" --batch 16 --lr 1e-3 --warmup 100 --schedule cosine --min-lr-ratio 0.1 \
        "${COMMON[@]}"
done

echo "exported: $OUT/tokenizer/model $OUT/nbp/model $OUT/ntp/model"
