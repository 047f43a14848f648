"""The engine contract: what every serving engine offers its callers (the api, batch jobs, benchmarks).

The in-process engine (engine/disagg.py Engine: prefill and decode workers in this process) and the
multi-process one (engine/remote.py RemoteEngine: workers in their own processes) both implement
`ServingEngine`, and their requests `EngineRequest`; tests/test_contracts.py checks both against these
declarations, so a caller written against the contract runs on either.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

from infire_jax.engine.sampling import SamplingParams

__all__ = ["EngineRequest", "ServingEngine"]


@runtime_checkable
class EngineRequest(Protocol):
    """One submitted request as the engine tracks it."""

    id: Any
    output: list[int]  # generated token ids so far (the first from prefill)
    status: str  # "queued" ... "done" or "failed"
    error: str | None  # why it failed (status "failed")
    finish_reason: str | None  # "stop" or "length" once finished normally

    @property
    def finished(self) -> bool:
        """Done or failed: nothing more will happen to it."""
        ...

    def metrics(self) -> dict[str, Any]:
        """Per-request figures: prompt/generated tokens, queue_s, ttft_s, tpot_s, e2e_s, ..."""
        ...


@runtime_checkable
class ServingEngine(Protocol):
    """Continuous batching over prefill and decode workers, driven by its caller's thread."""

    requests: dict[Any, Any]  # id -> its EngineRequest, while the engine holds it

    def submit(self, prompt: Sequence[int], params: SamplingParams | dict[str, Any], request_id: Any = None) -> EngineRequest:
        """Queue a request. Bad input fails this request alone (status "failed", error set)."""
        ...

    @property
    def busy(self) -> bool:
        """Some submitted request has not finished."""
        ...

    def step(self) -> None:
        """One round of work: prefill what is queued, move KV, decode the running batch."""
        ...

    def run(self) -> list[Any]:
        """Step until every submitted request is done or failed; the requests."""
        ...

    def stats(self) -> dict[str, Any]:
        """Engine-wide figures: requests, failed, generated_tokens, prompt_tokens, wall_s, tokens_per_s, ..."""
        ...
