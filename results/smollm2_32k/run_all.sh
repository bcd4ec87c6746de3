#!/usr/bin/env bash
# The 32k (4x) results, best effort: a small search seeded from the 16k result and one generation
# on top of it, scored on a held-out pydoc document and on two documents of two other domains
# (Vim help, Node.js docs). Resumable like results/smollm2_16k/run_all.sh (steps skipped when their output
# exists, the search resumed from its log). One 32k forward takes about 15 minutes on 2 CPU cores.
#   nohup nice -n 5 results/smollm2_32k/run_all.sh > /tmp/smollm2_32k.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/../.."
R=results/smollm2_32k
F16=results/smollm2_16k/search/factors.json
[[ -s $F16 ]] || { echo "$F16 missing: run results/smollm2_16k/run_all.sh first" >&2; exit 2; }

source results/step.sh

# 1. Seeded from the 16k result: lambda_2 at 32768 / 16384 = 2 on top of the 16k factors
#    (--base-factors; lambda_2 = 1, the 16k factors as they are, is a seed), written as
#    lambda_2 * lambda_16k. Population 5 (the seeds lambda_2 = 1, PI, NTK, YaRN and one mutation),
#    no further generation (--config.iterations=0), 1 window. The seeds lambda_2 = 1 and PI are
#    exactly the baselines "base" and "base*pi:2" and take their scores: 3 candidate forwards.
#    More generations later: rerun with a larger --config.iterations (the search resumes its log).
step $R/search/result.json longrope-jax search --model smollm2 --data results/data/search_32k.jsonl \
  --target-length 32768 --samples 1 --seed 0 --base-factors $F16 --out $R/search \
  --config.population=5 --config.iterations=0 --config.mutations=2 --config.crossovers=2 --config.parents=4
# 2. Held-out perplexity on the one 32k document no search saw, a step per method (about 15 minutes
#    each), most telling first: the search, YaRN (the best 16k baseline), the 16k factors as they are.
HELDOUT=(--model smollm2 --data results/data/heldout_32k.jsonl --length 32768 --samples 1 --seed 0)
step $R/heldout_ppl_search.jsonl longrope-jax ppl "${HELDOUT[@]}" --rope $R/search/factors.json
step $R/heldout_ppl_yarn4.jsonl longrope-jax ppl "${HELDOUT[@]}" --rope yarn:4
step $R/heldout_ppl_longrope16k.jsonl longrope-jax ppl "${HELDOUT[@]}" --rope $F16
# 3. The search's exact controls (issue 17): the 16k factors times exact NTK and YaRN at s = 2, the
#    search's baselines base*ntk:2 and base*yarn:2, on the held-out document.
python results/smollm2_32k/make_controls.py
for c in ntk2 yarn2; do
  step $R/heldout_ppl_base_$c.jsonl longrope-jax ppl "${HELDOUT[@]}" --rope $R/controls/base_$c.json
done
# 4. One evolution generation (issue 17): the search of step 1 extended by --config.iterations=1
#    (2 mutations + 2 crossovers of its 4 best: 4 forwards, about an hour) in search_gen1/, which
#    starts from a copy of search/'s log and baselines (the search replays them), so search/ stays
#    the zero-generation result that heldout_ppl_search.jsonl scored.
if [[ ! -s $R/search_gen1/log.jsonl ]]; then
  mkdir -p $R/search_gen1 && cp $R/search/log.jsonl $R/search/baselines.json $R/search_gen1/
fi
step $R/search_gen1/result.json longrope-jax search --model smollm2 --data results/data/search_32k.jsonl \
  --target-length 32768 --samples 1 --seed 0 --base-factors $F16 --out $R/search_gen1 \
  --config.population=5 --config.iterations=1 --config.mutations=2 --config.crossovers=2 --config.parents=4
rope_of() {  # a factors file without its provenance: what ppl scores
  python -c "import json,sys; d=json.load(open(sys.argv[1])); d.pop('provenance'); print(json.dumps(d, sort_keys=True))" "$1"
}
BEST=$R/search_gen1
if [[ "$(rope_of $R/search/factors.json)" == "$(rope_of $R/search_gen1/factors.json)" ]]; then
  echo "== the generation found nothing better than search/: its held-out score is heldout_ppl_search.jsonl"
  BEST=$R/search
else
  step $R/heldout_ppl_search_gen1.jsonl longrope-jax ppl "${HELDOUT[@]}" --rope $R/search_gen1/factors.json
fi
# 5. Held out on two other domains (issue 17): the first 32768 tokens of a Vim help file and of a
#    Node.js API file (results/data/heldout_domains_32k.jsonl), about 30 minutes a method.
DOMAINS=(--model smollm2 --data results/data/heldout_domains_32k.jsonl --length 32768 --samples 2 --seed 0)
step $R/heldout_domains/yarn4.jsonl longrope-jax ppl "${DOMAINS[@]}" --rope yarn:4
step $R/heldout_domains/$(basename $BEST).jsonl longrope-jax ppl "${DOMAINS[@]}" --rope $BEST/factors.json
for c in ntk2 yarn2; do
  step $R/heldout_domains/base_$c.jsonl longrope-jax ppl "${DOMAINS[@]}" --rope $R/controls/base_$c.json
done
# The zero-generation result (the NTK seed on the 0.01 grid) too: what the generation added over it.
step $R/heldout_domains/search.jsonl longrope-jax ppl "${DOMAINS[@]}" --rope $R/search/factors.json
# The attention-factor controls at 4x (LongRoPE's 1.074 against YaRN's 1.139): YaRN s=4's factors with
# LongRoPE's attention factor, the generation's best with YaRN's.
python results/smollm2_32k/make_controls.py  # again: search_gen1's control once it exists
for c in yarn4_longrope_attention search_gen1_yarn_attention; do
  step $R/heldout_domains/$c.jsonl longrope-jax ppl "${DOMAINS[@]}" --rope $R/controls/$c.json
done
# 6. The other baselines at s = 4.
for rope in ntk:4 dynamic:4 pi:4 none; do
  step $R/heldout_ppl_${rope/:/}.jsonl longrope-jax ppl "${HELDOUT[@]}" --rope $rope
done
echo "== $(date -u +%FT%TZ) all done"
