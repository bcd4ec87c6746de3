"""Settings shared by several commands' defaults (imported by their ``default.py``)."""

from ml_collections.config_dict import placeholder


def add_mesh(c):
    """The device mesh and the multi-process runtime (README "On a mesh"): ``mesh`` like
    ``data=2,sequence=4`` (unset: the local devices); ``coordinator`` HOST:PORT of process 0 with
    ``num_processes`` and ``process_id`` (unset on one host, and on a TPU pod, which finds them)."""
    c.mesh = placeholder(str)
    c.coordinator = placeholder(str)
    c.num_processes = placeholder(int)
    c.process_id = placeholder(int)
    return c


def add_model(c):
    """How a command loads its model: ``model`` (an HF directory, a .gguf file, ``smollm2``, a
    checkpoint or a Hub id), a ``tokenizer`` (tokenizer.json) overriding its own, the parameter
    dtype, and Mistral's sliding window switched off (as LongRoPE did)."""
    c.model = placeholder(str)
    c.tokenizer = placeholder(str)
    c.param_dtype = "float32"
    c.no_sliding_window = False
    return c
