"""Every setting of ``longrope-jax generate`` with its default (README: ``longrope-jax generate``)."""

import ml_collections
from ml_collections.config_dict import placeholder

from .. import common


def get_config():
    c = ml_collections.ConfigDict()
    common.add_model(c)
    c.prompt = placeholder(str)  # required
    c.max_new_tokens = 64
    c.rope = "model"  # the model as configured
    return c
