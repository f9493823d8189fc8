"""Observing the xla kernel's backward from tests: does it sweep the vocabulary a second time?"""

import jax
import jax.numpy as jnp

from opsd_jax.kernels import xla


def record_sweep_remainders(monkeypatch) -> list[int]:
    """Records, per backward, how many tokens' cotangents the xla kernel could not take from its
    forward (the remainder it sweeps again for); returns the list it appends to."""
    seen = []
    split = xla.split_cotangent

    def recording(cot_d_N, unit_N):
        c, rest_N = split(cot_d_N, unit_N)
        jax.debug.callback(lambda k: seen.append(int(k)), jnp.count_nonzero(rest_N))
        return c, rest_N

    monkeypatch.setattr(xla, "split_cotangent", recording)
    return seen
