#!/usr/bin/env bash
# Issue 17's re-run: 16k searches of SmolLM2 on 3 windows from two domains (Python source code and
# pydoc prose), then held-out perplexity on two other domains (Vim help, Node.js API docs) that no
# search saw. Each step is skipped when its output exists and the searches resume from their logs,
# so running this again after an interruption continues where it stopped. Hours on 2 CPU cores:
#   nohup nice -n 10 results/smollm2_16k_domains/run_all.sh > /tmp/smollm2_16k_domains.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
R=results/smollm2_16k_domains
C=$R/controls
# 2 windows of code (2 of the 6 modules, chosen by the seed) + 1 of pydoc prose (the old search window).
SEARCH=(--model smollm2 --data results/data/search_code.jsonl --data results/data/search_16k.jsonl
        --target-length 16384 --samples 3 --seed 0
        --config.population=16 --config.iterations=3 --config.mutations=4 --config.crossovers=4 --config.parents=8)
# 4 held-out windows: both Vim help files and both Node.js API files (2 per source).
HELDOUT=(--model smollm2 --data results/data/heldout_vim.jsonl --data results/data/heldout_nodejs.jsonl
         --length 16384 --samples 4 --seed 0)

source results/step.sh
heldout() {  # heldout NAME ROPE: one method's held-out perplexity (4 windows), a step of its own
  step $R/heldout/$1.jsonl longrope-jax ppl "${HELDOUT[@]}" --rope "$2"
}

# 1. Held-out (first: no search needed): the baselines, the committed 16k factors (one pydoc window) and the attention-factor
#    controls (factors files written by make_controls.py).
python $R/make_controls.py  # the search files that exist (a running search's factors.json is its best so far)
for m in yarn:2 ntk:2 dynamic:2 pi:2; do heldout "${m/:/}" "$m"; done
heldout yarn_longrope_attention $C/yarn_longrope_attention.json
heldout search16k results/smollm2_16k/search/factors.json
heldout search16k_yarn_attention $C/search16k_yarn_attention.json
heldout search16k_lr2 results/smollm2_16k/search_longrope2/factors.json
heldout search16k_lr2_yarn_attention $C/search16k_lr2_yarn_attention.json
# 2. The search with the paper's attention factor (population 16, then 3 generations of 4 mutations
#    + 4 crossovers: 40 candidates, 5 baselines, 3 windows each).
step $R/search/result.json longrope-jax search "${SEARCH[@]}" --out $R/search
python $R/make_controls.py  # again: its control of the finished search
# 3. The re-run's search on held-out text, as it is and with YaRN's attention factor.
heldout search $R/search/factors.json
heldout search_yarn_attention $C/search_yarn_attention.json
# 4. The same search with the attention factor as a gene on [1.0, 1.2] (step 0.01), and its held-out text.
step $R/search_gene/result.json longrope-jax search "${SEARCH[@]}" --config.attention_factor_range=[1.0,1.2] \
  --out $R/search_gene
python $R/make_controls.py
heldout search_gene $R/search_gene/factors.json
heldout search_gene_yarn_attention $C/search_gene_yarn_attention.json
echo "== $(date -u +%FT%TZ) all done"
