#!/usr/bin/env bash
# The 16k LongRoPE search (resumable: run it again and it continues from search/log.jsonl).
# Budget on 2 CPU cores: population 12, 4 generations of 4 mutations + 4 crossovers, parents 6,
# one 16k window (results/data/search_16k.jsonl): 44 candidates + 5 baselines, ~2 min each.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec longrope-jax search --model smollm2 --data results/data/search_16k.jsonl --target-length 16384 \
  --out results/smollm2_16k/search --samples 1 --seed 0 \
  --config.population=12 --config.iterations=4 --config.mutations=4 --config.crossovers=4 --config.parents=6
