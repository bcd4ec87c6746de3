"""The progressive extension as a pipeline of stages (:mod:`.stages`): what each stage is, what it
reads from the stages before it, and its settings checked by its own command's rules. The
``extend`` job (``longrope_jax.jobs.extend``) runs them, passing weights in memory."""
