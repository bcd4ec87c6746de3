"""ppl of SmolLM2-135M (8k window) at 10k tokens under none, PI, NTK and YaRN.

    longrope-jax ppl --config smollm2_beyond_window [--config.length=[16384]]
"""

from . import default


def get_config():
    c = default.get_config()
    c.model = "smollm2"
    c.data = ["pydoc:"]
    c.length = [10240]
    c.rope = ["none", "pi:2", "ntk:2", "yarn:2"]
    return c
