"""Process 0's Python objects on every process: how one process decides and the others follow
(the search's generations, a job's stop). A collective: every process calls it, in the same order.
"""

from __future__ import annotations

import pickle

import numpy as np


def broadcast(obj=None):
    """Process 0's ``obj`` on every process (others pass nothing). Pickled, so any picklable
    value: numpy arrays, pytrees of them, tuples of strings. One process: ``obj`` itself."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return obj
    main = jax.process_index() == 0
    payload = pickle.dumps(obj) if main else b""
    n = int(multihost_utils.broadcast_one_to_all(np.int64(len(payload))))
    buf = np.frombuffer(payload, np.uint8) if main else np.zeros(n, np.uint8)
    return pickle.loads(np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes())
