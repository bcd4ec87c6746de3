"""Training: the chunk index and its Grain pipeline (:mod:`.data`), the Optax train step
(:mod:`.step`)."""
