"""``longrope-jax convert`` configs."""
