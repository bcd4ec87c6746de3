#!/usr/bin/env bash
# Does fine-tuning from the searched factors beat YaRN? Two arms of one PoSE stage of SmolLM2-135M
# (8k window) for a 32k window that differ only in their starting factors: the committed 32k
# LongRoPE factors (results/smollm2_32k/search_gen1) and YaRN s=4. Every other setting is
# configs/train/smollm2_32k_pose.py: rows of 2048 tokens whose positions span 32768 (2 chunks),
# one row a step, 300 steps, AdamW lr 2e-5 after 20 warmup steps with linear decay to 0, clipping
# 1.0, no weight decay, fp32, on the Python standard library (stdlib:, code), seed 0: the same
# rows, skips and rates in both arms. Held out: results/data/heldout_ft_32k.jsonl (two Vim help
# files, two Node.js API files; nothing is searched or trained on them).
#
# Resumable: the training runs resume from their checkpoints (the same command), the evaluation
# steps are skipped when their output exists. Run directories live outside the work tree
# ($RUNS, default /work/runs/smollm2_32k_ft); a lost run directory costs its arm's training
# (about 100 minutes on 2 CPU cores) and restarts from scratch with the same command, to the same
# losses (the order of rows and skips depends only on the seed and the step).
#   nohup nice -n 10 results/smollm2_32k_ft/run_all.sh > /work/runs/smollm2_32k_ft.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
R=results/smollm2_32k_ft
RUNS=${RUNS:-/work/runs/smollm2_32k_ft}
F32=results/smollm2_32k/search_gen1/factors.json
DATA=results/data/heldout_ft_32k.jsonl
source results/step.sh
mkdir -p "$RUNS"
echo "== $(date -u +%FT%TZ) revision $(git rev-parse HEAD)$(git diff --quiet || echo ' (with local changes)')"

# 1. The two arms: the same stage, only --rope differs.
ARM=(--config smollm2_32k_pose)
longrope-jax train "${ARM[@]}" --out "$RUNS/longrope" --rope $F32 | tail -1
longrope-jax train "${ARM[@]}" --out "$RUNS/yarn4" --rope yarn:4 | tail -1

# 2. Held-out perplexity at 32k and 16k on the 4 documents, after and before fine-tuning (the base
#    model with each arm's starting factors). After: each arm's final/ with its own RoPE (--rope
#    model: the factors attached, or YaRN in its config). About 30 minutes a 32k step.
for L in 32768 16384; do
  PPL=(--data $DATA --length $L --samples 4 --seed 0)
  step $R/after/longrope_$L.jsonl longrope-jax ppl --model "$RUNS/longrope/final" "${PPL[@]}"
  step $R/after/yarn4_$L.jsonl longrope-jax ppl --model "$RUNS/yarn4/final" "${PPL[@]}"
  step $R/before/longrope_$L.jsonl longrope-jax ppl --model smollm2 "${PPL[@]}" --rope $F32
  step $R/before/yarn4_$L.jsonl longrope-jax ppl --model smollm2 "${PPL[@]}" --rope yarn:4
done

# 3. Passkey retrieval at 16k, 5 trials, after and before.
PK=(--lengths 16384 --trials 5 --seed 0)
step $R/after/passkey_longrope.jsonl longrope-jax passkey --model "$RUNS/longrope/final" "${PK[@]}" \
  --out $R/after/passkey_longrope
step $R/after/passkey_yarn4.jsonl longrope-jax passkey --model "$RUNS/yarn4/final" "${PK[@]}" --out $R/after/passkey_yarn4
step $R/before/passkey_longrope.jsonl longrope-jax passkey --model smollm2 --rope $F32 "${PK[@]}" \
  --out $R/before/passkey_longrope
step $R/before/passkey_yarn4.jsonl longrope-jax passkey --model smollm2 --rope yarn:4 "${PK[@]}" \
  --out $R/before/passkey_yarn4
echo "== $(date -u +%FT%TZ) all done"
