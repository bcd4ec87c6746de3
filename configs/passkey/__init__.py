"""``longrope-jax passkey`` configs."""
