#!/usr/bin/env bash
# Retrain the demo models shipped in nbp/assets/demo (see nbp/assets/demo/MODEL_CARD.md).
#
#   bash scripts/train_demo.sh [RUNS_DIR]      (default RUNS_DIR: demo_runs)
#
# CPU only, one thread per process, fixed seeds. Data: nbp.data.synthetic with seed 0
# (clips 0..9999), 16x16 frames, one sprite per clip, palette backgrounds. The held-out
# clips of `nbp eval` use seed 1001, which no step below reads. Steps 3a and 3b are
# independent (they were run side by side); a rerun resumes each training from its
# checkpoint (a finished one does no more steps) and skips an existing token cache.
set -euo pipefail
RUNS=${1:-demo_runs}
mkdir -p "$RUNS"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
resume() { if [ -f "$1/checkpoint.pt" ]; then echo --resume; fi; }
DATA=(--data synthetic --resolution 16 --data-seed 0 --num-clips 10000 --sprites 1 1 --background palette)

# 1. Tokenizer: causal 3D CNN + FSQ (8,5,5,5) = 1000 codes, one downsampling (2,2,2):
#    17x16x16 clips -> 9x8x8 codes. Trained on 9-frame clips: the network is causal in
#    time, so the first 9 frames of a 17-frame clip are encoded identically.
cat > "$RUNS/tok_config.json" <<'JSON'
{"in_channels": 3, "encoder_channels": [16, 32], "encoder_units": [1, 1],
 "decoder_channels": [32, 16], "decoder_units": [1, 1], "strides": [[2, 2, 2]],
 "kernel_size": 3, "norm_groups": 1, "fsq_levels": [8, 5, 5, 5]}
JSON
nbp train tokenizer $(resume "$RUNS/tok") --config "$RUNS/tok_config.json" \
    --out "$RUNS/tok" "${DATA[@]}" --num-frames 9 --loss l1+mse --steps 12000 --batch 8 --lr 2e-3 \
    --warmup 100 --schedule cosine --min-lr-ratio 0.05 --weight-decay 0.0 --seed 0 --log-every 100 \
    --ckpt-every 500 --no-progress --device cpu

# 2. Token cache: every training clip (17 frames) encoded once.
[ -f "$RUNS/tokens.safetensors" ] || nbp train tokens --tokenizer "$RUNS/tok/model" \
    --out "$RUNS/tokens.safetensors" "${DATA[@]}" --num-frames 17 --batch 32 --device cpu --no-progress

# 3a/3b. Two class-conditional generators of equal size and budget (4 layers, 128 wide,
#    2400 steps of 16 clips): NBP with row blocks of 8 tokens, NTP with one token per step.
for kind in nbp ntp; do
    block="1 1 8"; [ "$kind" = ntp ] && block="1 1 1"
    nbp train transformer $(resume "$RUNS/$kind") \
        --tokens "$RUNS/tokens.safetensors" --out "$RUNS/$kind" --preset tiny --n-layer 4 --n-head 4 \
        --n-embd 128 --block-shape $block --classes 12 --steps 2400 --batch 16 \
        --lr 2e-3 --warmup 50 --schedule cosine --min-lr-ratio 0.05 --weight-decay 0.01 --seed 0 \
        --log-every 20 --ckpt-every 100 --no-progress --device cpu
done

# 4. Ship float16 copies into nbp/assets/demo, then measure on held-out clips.
python "$HERE/export_demo.py" "$RUNS"
nbp eval --model demo --json

# 5. nbp_long, the NBP generator for videos past 17 frames: the shipped NBP model fine-tuned
#    on windows of 9 latent frames cut from 65-frame clips of the same training data (33
#    latent frames each; a quarter of the windows start at the clip's start, the rest
#    mid-clip, as every window of nbp.long_video after the first), encoded by the shipped
#    tokenizer. Then ship it beside the others and measure long videos (nbp eval --frames 65).
DEMO=$(python -c "from nbp.demo import DEMO_DIR; print(DEMO_DIR)")
[ -f "$RUNS/tokens65.safetensors" ] || nbp train tokens --tokenizer "$DEMO/tokenizer" \
    --out "$RUNS/tokens65.safetensors" "${DATA[@]}" --num-frames 65 --batch 32 --device cpu --no-progress
nbp train transformer $(resume "$RUNS/nbp_long") --tokens "$RUNS/tokens65.safetensors" \
    --crop-frames 9 --crop-start-prob 0.25 --init "$DEMO/nbp" --out "$RUNS/nbp_long" \
    --preset tiny --n-layer 4 --n-head 4 --n-embd 128 --block-shape 1 1 8 --classes 12 \
    --steps 2500 --batch 16 --lr 1e-3 --warmup 50 --schedule cosine --min-lr-ratio 0.05 \
    --weight-decay 0.01 --seed 0 --log-every 20 --ckpt-every 100 --no-progress --device cpu
python "$HERE/export_demo.py" "$RUNS"
nbp eval --model demo --frames 65 --json
