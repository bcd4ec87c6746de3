"""Every setting of ``longrope-jax search`` with its default: the LongRoPE paper's settings (Ding et
al. 2024, section 3.2; ``docs/method.md``).

    longrope-jax search --model smollm2 --data DOCS.jsonl --target-length 16384 \
        --out runs/smollm2-16k [--config.population=32 ...]

The search library's ``SearchSettings`` takes its defaults from here.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from .. import common


def get_config():
    c = ml_collections.ConfigDict()
    # The job: set these here or with --model / --data / --target-length / --out.
    common.add_model(c)
    c.data = placeholder(list)  # required
    c.field = "text"
    c.target_length = placeholder(int)  # required
    c.out = placeholder(str)  # required
    c.samples = 5  # the paper: 5 PG19 validation documents, one window each
    c.seed = 0
    c.attention = "auto"
    c.q_chunk = placeholder(int)  # unset: 512 beyond 512 tokens
    c.loss_chunk = 1024
    c.memory_budget_gib = placeholder(float)  # unset: 80% of free device memory, 4 GiB on CPU
    c.max_evals = placeholder(int)  # budgets: unset = run all iterations
    c.time_budget = placeholder(float)  # seconds
    common.add_mesh(c)
    # The algorithm (the paper's table of settings).
    c.population = 64
    c.iterations = 40
    c.mutations = 16
    c.crossovers = 16
    c.parents = 32
    c.mutation_prob = 0.3
    c.crossover_prob = 0.3  # each pair from the second parent with probability 0.3 * 0.5
    c.crossover_tries = 20
    c.mutation_tries = 1000
    c.step = 0.01
    c.factor_range = "paper"  # [1, 1.25 s]; "official": [1, 1 + s] (s = target length / window)
    c.start_tokens = [0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256]
    c.start_token_prob = 0.3
    c.seed_factors = []  # extra initial candidates: factors.json files
    # Progressive / short-context search (factors.json files; see the README).
    # search lambda_2 on a model fine-tuned with this file's lambda_1 ("model": the longrope block the model
    # ships, as Phi-3 does)
    c.base_factors = placeholder(str)
    c.readjust = placeholder(str)  # re-search this file's short factors / a per_length entry at target_length
    # LongRoPE2 (configs/search/longrope2.py sets these).
    c.mode = "longrope"  # or "longrope2": critical-dimension search
    c.critical_range = []  # longrope2: [lo, hi] of the critical-dimension gene; [] = automatic
    c.fitness = "ppl"  # or "needle": perplexity of needle answers only
    c.needles = 4
    # The attention factor (cos/sin multiplier): [] = the paper's sqrt(1 + ln s / ln L_orig);
    # [lo, hi] searches it as a gene on a grid of attention_factor_step (e.g. [1.0, 1.2]).
    c.attention_factor_range = []
    c.attention_factor_step = 0.01
    return c
