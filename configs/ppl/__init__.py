"""``longrope-jax ppl`` configs."""
