"""Diagnostics on rollouts: entropies of the student, the privileged and the vanilla teacher on the
same tokens, fork rates, self-correction markers and the teacher's token-level signal at
reconsideration tokens (`opsd-jax analyze`)."""
