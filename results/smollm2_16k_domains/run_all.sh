#!/usr/bin/env bash
# Issue 17's re-run: 16k searches of SmolLM2 on 3 windows from two domains (Python source code and
# pydoc prose), then held-out perplexity on two other domains (Vim help, Node.js API docs) that no
# search saw. Each step is skipped when its output exists and the searches resume from their logs,
# so running this again after an interruption continues where it stopped. Hours on 2 CPU cores:
#   nohup nice -n 10 results/smollm2_16k_domains/run_all.sh > /tmp/smollm2_16k_domains.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
R=results/smollm2_16k_domains
# 2 windows of code (2 of the 6 modules, chosen by the seed) + 1 of pydoc prose (the old search window).
SEARCH=(--model smollm2 --data results/data/search_code.jsonl --data results/data/search_16k.jsonl
        --target-length 16384 --samples 3 --seed 0
        --config.population=16 --config.iterations=3 --config.mutations=4 --config.crossovers=4 --config.parents=8)

source results/step.sh

# 1. The search with the paper's attention factor (population 16, then 3 generations of 4 mutations
#    + 4 crossovers: 40 candidates, 5 baselines, 3 windows each).
step $R/search/result.json longrope-jax search "${SEARCH[@]}" --out $R/search
echo "== $(date -u +%FT%TZ) all done"
