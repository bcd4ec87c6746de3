#!/usr/bin/env bash
# Issue 17: a fair held-out test of the LongRoPE2 mode, whose fitness is needle perplexity: the
# committed plain and LongRoPE2-mode 16k factors and YaRN on 2 held-out windows (one Vim help
# file, one Node.js doc) with 4 needles planted in each, scored on the answers' digits
# (`ppl --needles 4`), beside the plain perplexity of the same windows. Resumable like run_all.sh:
#   nohup nice -n 10 results/smollm2_16k_domains/needles.sh > /tmp/needles.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
R=results/smollm2_16k_domains
source results/step.sh
step $R/heldout_needles/needles.jsonl longrope-jax ppl --model smollm2 --data results/data/heldout_vim.jsonl \
  --data results/data/heldout_nodejs.jsonl --length 16384 --samples 2 --seed 0 --needles 4 \
  --rope yarn:2 --rope results/smollm2_16k/search/factors.json --rope results/smollm2_16k/search_longrope2/factors.json
echo "== $(date -u +%FT%TZ) needles done"
