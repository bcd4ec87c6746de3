"""``longrope-jax generate`` configs."""
