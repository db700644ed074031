#!/usr/bin/env bash
# The dual-stream method through verl 0.9.1 on one node (Lingshu-7B, 8 GPUs):
#
#   scripts/verl_train.sh convert          ViTAR-16K JSON -> verl parquet ($VITAR_TRAIN_JSON, $VITAR_VAL_JSON)
#   scripts/verl_train.sh stage1 [...]      stage 1 (localization), configs/verl/stage1_localization.yaml
#   scripts/verl_train.sh merge             latest stage-1 FSDP checkpoint -> HF model (stage 2's start)
#   scripts/verl_train.sh stage2 [...]      stage 2 (sparse reasoning, resuming stage 1)
#   scripts/verl_train.sh all               convert, stage1, merge, stage2
#
# Extra arguments are hydra overrides (e.g. trainer.total_epochs=1 data.train_batch_size=32).
# Environment: LINGSHU_7B (model path or HF id), TSPARSE_VERL_DATA (parquet folder, default
# data/verl), TSPARSE_VERL_CKPT (checkpoint root, default checkpoints), TSPARSE_STAGE1_HF
# (stage 2's start, default $TSPARSE_VERL_CKPT/stage1_localization/hf), PYTHON (default python).
# Multi-node: start Ray on every node first and set trainer.nnodes (README, verl section).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
export TSPARSE_VERL_DATA="${TSPARSE_VERL_DATA:-$ROOT/data/verl}"
export TSPARSE_VERL_CKPT="${TSPARSE_VERL_CKPT:-$ROOT/checkpoints}"
export TSPARSE_STAGE1_HF="${TSPARSE_STAGE1_HF:-$TSPARSE_VERL_CKPT/stage1_localization/hf}"
CONFIGS="$ROOT/configs/verl"

convert() {
    : "${VITAR_TRAIN_JSON:?set VITAR_TRAIN_JSON to the ViTAR-16K-format training JSON}"
    : "${VITAR_VAL_JSON:?set VITAR_VAL_JSON to the ViTAR-16K-format validation JSON}"
    "$PYTHON" -m tsparse.integrations.verl.data --input "$VITAR_TRAIN_JSON" --output "$TSPARSE_VERL_DATA" \
        --stream localization --split train
    "$PYTHON" -m tsparse.integrations.verl.data --input "$VITAR_VAL_JSON" --output "$TSPARSE_VERL_DATA" \
        --stream localization --split val
}

stage1() {
    "$PYTHON" -m verl.trainer.main_ppo --config-path="$CONFIGS" --config-name=stage1_localization "$@"
}

merge() {
    local root="$TSPARSE_VERL_CKPT/stage1_localization"
    local step
    step="$(cat "$root/latest_checkpointed_iteration.txt")"
    "$PYTHON" -m verl.model_merger merge --backend fsdp --local_dir "$root/global_step_$step/actor" \
        --target_dir "$TSPARSE_STAGE1_HF"
}

stage2() {
    "$PYTHON" -m verl.trainer.main_ppo --config-path="$CONFIGS" --config-name=stage2_sparse "$@"
}

cmd="${1:-}"
shift || true
case "$cmd" in
    convert) convert ;;
    stage1) stage1 "$@" ;;
    merge) merge ;;
    stage2) stage2 "$@" ;;
    all) convert; stage1 "$@"; merge; stage2 "$@" ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
esac
