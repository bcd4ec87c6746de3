"""What every ``longrope-jax extend`` pipeline states: its base model, the data its stages share,
and its stages, in order. A pipeline config builds on this and fills ``stages`` and ``order``.

    longrope-jax extend --config tiny --out runs/extend-tiny [--config.stages.ft8x.steps=50 ...]

Each stage is a section of ``stages`` named in ``order``, with a ``kind`` and, besides its
command's settings (``train``'s, ``search``'s, ...; validated by that command's rules):

- ``weights``: the model the stage works on: ``base``, or an earlier ``train`` stage (default: the
  latest one before it, else ``base``).
- ``factors``: for ``train``, the RoPE it fine-tunes with: an earlier ``search``/``readjust``
  stage's factors, an earlier ``train`` stage's, a factors file or a ``--rope`` value; for
  ``search``, factors the model was fine-tuned with (a progressive search: ``lambda_2`` on top of
  them); for ``readjust``, the factors file it re-tunes; for ``evaluate`` and ``export``, the
  factors to score or ship (default: the model's own).

Kinds: ``train`` (a fine-tuning stage), ``search`` (factors at ``target_length``), ``readjust``
(short factors at a length within the original window), ``evaluate`` (perplexity at ``lengths``
on ``heldout``, against ``ropes``; needle perplexity with ``needles``; passkey accuracy,
``passkey_trials`` at each of ``passkey_lengths``), ``export`` (an HF directory).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from .. import common


def get_config():
    c = ml_collections.ConfigDict()
    c.model = placeholder(str)  # the base model (unset: the first train stage starts from its model_config)
    c.data = ["stdlib:"]  # what training and searches read, unless a stage says otherwise
    c.heldout = ["pydoc:"]  # what evaluate stages score
    c.shared = ml_collections.ConfigDict()  # values a config's stages derive from (FieldReferences)
    c.stages = ml_collections.ConfigDict()  # name -> section
    c.order = []  # the stages' names, in the order they run
    c.out = placeholder(str)  # the run directory; required
    c.redo = placeholder(str)  # a stage to discard, with the stages after it, and run again
    common.add_mesh(c)
    return c


def search(shared, target: str, suffix: str = "", **kw) -> dict:
    """A search (or readjust) section at ``shared[target]`` tokens whose budgets are the pipeline's
    shared values ``population``, ``iterations``, ``samples``, ``mutations`` (crossovers too) and
    ``parents``, each read with ``suffix`` (``_long``: the longest search's own); no start tokens,
    which the HF export cannot carry. ``kw``: the section's other settings."""
    def ref(key):
        return shared.get_ref(key + suffix)

    return {"target_length": shared.get_ref(target), "population": ref("population"), "iterations": ref("iterations"),
            "samples": ref("samples"), "mutations": ref("mutations"), "crossovers": ref("mutations"),
            "parents": ref("parents"), "start_tokens": [0], **kw}
