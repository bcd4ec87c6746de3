#!/usr/bin/env bash
# Every 16k result, in order; each step is skipped when its output exists, and the searches
# resume from their logs, so running this again after an interruption continues where it stopped.
# Runs for hours on 2 CPU cores (one 16k forward is about 2 minutes); start it in the background:
#   nohup nice -n 10 results/smollm2_16k/run_all.sh > /tmp/smollm2_16k.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
R=results/smollm2_16k
SEARCH=(--model smollm2 --data results/data/search_16k.jsonl --target-length 16384 --samples 1 --seed 0
        --config.population=12 --config.iterations=3 --config.mutations=4 --config.crossovers=4 --config.parents=6)
HELDOUT=(--model smollm2 --data results/data/heldout_16k.jsonl --length 16384 --samples 2 --seed 0)

source results/step.sh

# 1. The LongRoPE search (population 12, then 3 generations of 4 mutations + 4 crossovers: 36
#    candidates; 1 window).
step $R/search/result.json longrope-jax search "${SEARCH[@]}" --out $R/search
# 2. Held-out perplexity: the baselines and the search's factors on 2 documents it never saw.
step $R/heldout_ppl.jsonl longrope-jax ppl "${HELDOUT[@]}" --rope none --rope pi:2 --rope ntk:2 --rope dynamic:2 \
  --rope yarn:2 --rope $R/search/factors.json
# 3. Passkey retrieval, 10 trials at 16k, for YaRN and the search's factors.

step $R/passkey_yarn/result.jsonl longrope-jax passkey --model smollm2 --lengths 16384 --trials 10 --seed 0 \
  --rope yarn:2 --out $R/passkey_yarn
step $R/passkey_longrope/result.jsonl longrope-jax passkey --model smollm2 --lengths 16384 --trials 10 --seed 0 \
  --rope $R/search/factors.json --out $R/passkey_longrope
# 4. The LongRoPE2-mode search (critical-dimension gene, needle-driven fitness with 8 needles in the
#    window: 48 scored digits), same budget.
step $R/search_longrope2/result.json longrope-jax search --config configs/search/longrope2.py "${SEARCH[@]}" --config.needles=8 \
  --out $R/search_longrope2
# 5. Its held-out perplexity (same documents and seed as step 2).
step $R/heldout_ppl_longrope2.jsonl longrope-jax ppl "${HELDOUT[@]}" --rope $R/search_longrope2/factors.json
# 6. Passkey for the LongRoPE2-mode factors.

step $R/passkey_longrope2/result.jsonl longrope-jax passkey --model smollm2 --lengths 16384 --trials 10 --seed 0 \
  --rope $R/search_longrope2/factors.json --out $R/passkey_longrope2
echo "== $(date -u +%FT%TZ) all done"
