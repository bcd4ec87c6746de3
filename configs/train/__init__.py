"""``longrope-jax train`` configs."""
