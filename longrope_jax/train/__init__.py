"""Training: the chunk index and its Grain order (:mod:`.data`), the Optax train step
(:mod:`.step`), the trainer over params in memory (:mod:`.trainer`), model FLOPs and peak rates
(:mod:`.flops`), and training programs compiled for a TPU topology (:mod:`.aot`)."""
