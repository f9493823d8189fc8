"""Sampler: JetStream-shaped engine (prefill / insert / generate) over a paged KV cache,
continuous-batching orchestrator, OpenAI-compatible server. It knows nothing about training."""

from opsd_jax.sampler.engine import DecodeState, Engine, RequestError, SamplerConfig, TokenResult
from opsd_jax.sampler.orchestrator import Completion, Orchestrator, OrchestratorClosed, SamplerCrashed
from opsd_jax.sampler.sampling import SamplingParams, filtered_logits, sample_tokens

__all__ = [
    "Completion",
    "DecodeState",
    "Engine",
    "Orchestrator",
    "OrchestratorClosed",
    "RequestError",
    "SamplerConfig",
    "SamplerCrashed",
    "SamplingParams",
    "TokenResult",
    "filtered_logits",
    "sample_tokens",
]
