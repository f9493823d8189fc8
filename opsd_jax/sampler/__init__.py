"""Sampler: JetStream-shaped engine (prefill / insert / generate), continuous-batching
orchestrator, OpenAI-compatible server. It knows nothing about training."""

from opsd_jax.sampler.engine import DecodeState, Engine, Prefix, RequestError, SamplerConfig, TokenResult
from opsd_jax.sampler.orchestrator import Completion, Orchestrator
from opsd_jax.sampler.sampling import SamplingParams, filtered_logits, sample_tokens

__all__ = [
    "Completion",
    "DecodeState",
    "Engine",
    "Orchestrator",
    "Prefix",
    "RequestError",
    "SamplerConfig",
    "SamplingParams",
    "TokenResult",
    "filtered_logits",
    "sample_tokens",
]
