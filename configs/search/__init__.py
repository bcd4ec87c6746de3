"""``longrope-jax search`` configs."""
