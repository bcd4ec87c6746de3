"""``longrope-jax extend`` configs: progressive extension pipelines (and the demo's)."""
