"""A launcher for TPU slices: create, set up, run, watch (re-create and resume after a preemption),
status, logs, stop, delete, over the Google Cloud CLI, and xpk workloads (docs/pods.md).

Outside the installed package and without jax: it runs on a laptop and drives the workers over ssh.
"""
