"""Ahead-of-time plans: compile a run's programs for a named TPU topology from a CPU host and
report their per-chip memory (`opsd-jax plan`)."""
