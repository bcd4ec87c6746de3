"""Every setting of ``longrope-jax convert`` with its default (README: ``longrope-jax convert``)."""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
    c = ml_collections.ConfigDict()
    c.model = placeholder(str)  # HF directory, .gguf, smollm2, checkpoint or Hub id; required
    c.out = placeholder(str)  # required; must not exist unless overwrite
    c.factors = placeholder(str)  # factors.json attached to a checkpoint, or written into the HF config
    c.to = placeholder(str)  # checkpoint or hf; unset: hf from a checkpoint, checkpoint otherwise
    c.overwrite = False
    c.allow_drop_start_tokens = False  # HF cannot express start tokens: refuse unless this is set
    c.shard_bytes = 2 * 2**30  # largest safetensors shard of an HF export
    return c
