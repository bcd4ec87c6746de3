"""Every setting of ``longrope-jax passkey`` with its default (README: ``longrope-jax passkey``)."""

import ml_collections
from ml_collections.config_dict import placeholder

from .. import common


def get_config():
    c = ml_collections.ConfigDict()
    common.add_model(c)
    c.lengths = placeholder(list)  # prompt lengths in tokens; required
    c.trials = 10  # per length, at stratified random depths
    c.rope = "model"  # the model as configured
    c.seed = 0
    c.out = placeholder(str)  # directory for passkey.png and trials.jsonl (a rerun resumes)
    return c
