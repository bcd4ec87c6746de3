"""Every setting of ``longrope-jax plan`` with its default (README: ``longrope-jax plan``). Its
``--config`` names the train or extend config to plan; ``--config.KEY=VALUE`` overrides go there."""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config():
    c = ml_collections.ConfigDict()
    c.topology = placeholder(str)  # e.g. v5p:4x4x4; unset: the configs/meshes slice whose mesh the config names
    c.mesh = placeholder(str)  # unset: the config's mesh
    c.stage = placeholder(list)  # training stages to plan (an extend config's names); unset: all
    c.suggest = True  # compile changes that would make a stage that does not fit fit
    c.gpu = placeholder(str)  # h100 or h200: one GPU, the analytic estimate only (nothing compiles for a GPU here)
    return c
