"""The public surface: `load(model_dir)` -> Model with `logits`, `generate` and text helpers."""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from infire_jax import boot
from infire_jax.checkpoint import store
from infire_jax.config import ModelConfig
from infire_jax.engine import generation
from infire_jax.engine.build import Deployment, EngineOptions
from infire_jax.engine.disagg import Engine, Request
from infire_jax.engine.disagg import generate as run_engine
from infire_jax.engine.sampling import SamplingParams, per_request
from infire_jax.sharding import load_deployment

__all__ = ["load", "Model"]


class Model:
    """A loaded model: colocated (one placement serves prefill and decode) or disaggregated (prefill
    and decode on distinct meshes, each with its own copy of the weights in its own layout)."""

    def __init__(self, deployment: Deployment):
        self.deployment = deployment
        self.cfg: ModelConfig = deployment.cfg
        self.model_dir = deployment.model_dir
        self.programs = deployment.programs(deployment.prefill_meshes[0])
        self.decode_programs = deployment.programs(deployment.decode_meshes[0])
        self.placed = self.programs.placed
        self._engine: Engine | None = None
        self._tokenizer = None

    @property
    def disaggregated(self) -> bool:
        return self.decode_programs is not self.programs

    @property
    def engine(self) -> Engine:
        """The serving engine behind `generate` (one colocated worker, or one prefill and one decode
        worker), made on first use (its workers allocate their KV pools)."""
        if self._engine is None:
            self._engine = self.deployment.engine()
        return self._engine

    @property
    def context_length(self) -> int:
        return self.cfg.max_position_embeddings

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Full-sequence logits, float32 (B, T, vocab), for int32 tokens (B, T) with no padding."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] == 0:
            raise generation.RequestError(f"tokens must be a non-empty (batch, length) array, got shape {tokens.shape}")
        for row in tokens:
            generation.validate_prompt(row, self.cfg.vocab_size, self.context_length, 0)
        return self.programs.logits(tokens.astype(np.int32))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop_token_ids: Sequence[int] = (),
    ) -> list[list[int]]:
        """New tokens for each prompt. Request i draws with seed `seed + i`; a row ends after
        max_new_tokens or after emitting one of stop_token_ids (kept in the output)."""
        if isinstance(prompts, np.ndarray) and prompts.ndim == 1 or (prompts and isinstance(prompts[0], (int, np.integer))):
            raise generation.RequestError("prompts must be a list of token-id lists (one per request), not one flat list")
        params = per_request(len(prompts), max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids)
        arrays = [
            generation.validate_prompt(p, self.cfg.vocab_size, self.context_length, max_new_tokens) for p in prompts
        ]
        return [r.output for r in self.run_requests(arrays, params)]

    def run_requests(
        self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams], with_logits: bool = False
    ) -> list[Request]:
        """Run requests with per-request sampling params through the engine; raises the first error."""
        reqs = run_engine(self.engine, prompts, params, with_logits)
        for r in reqs:
            if r.status == "failed":
                raise generation.RequestError(f"request {r.id} failed: {r.error}")
        return reqs

    def warm_up(self, prompt_lengths: Sequence[int], max_new_tokens: int) -> dict[str, Any]:
        """Compile (or load from the persistent cache) every program requests with these prompt
        lengths, submitted together, and max_new_tokens will use, before the first real request
        (engine/warmup.py). Returns seconds and programs compiled / loaded."""
        from infire_jax.engine.warmup import warm_up

        return warm_up(self.engine, prompt_lengths, max_new_tokens)

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Save the loaded parameters with orbax (restorable by `load(path)` on any mesh)."""
        return store.save(self.placed, path, self.model_dir)

    # ---- text helpers ----------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The `tokenizers.Tokenizer` of the checkpoint (tokenizer.json)."""
        if self._tokenizer is None:
            path = (self.model_dir or pathlib.Path(".")) / "tokenizer.json"
            if not path.is_file():
                raise FileNotFoundError(f"no tokenizer.json in {self.model_dir}; pass token ids instead of text")
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(path))
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        bos = self.cfg.bos_token_id
        return ([bos] if bos is not None else []) + ids

    def generate_text(self, prompts: Sequence[str], *, max_new_tokens: int, **sampling: Any) -> list[str]:
        """Text in, text out; stops at the model's EOS tokens unless stop_token_ids is given."""
        sampling.setdefault("stop_token_ids", self.cfg.eos_token_ids)
        outs = self.generate([self.encode(p) for p in prompts], max_new_tokens=max_new_tokens, **sampling)
        stop = set(sampling["stop_token_ids"])
        return [self.tokenizer.decode([t for t in o if t not in stop]) for o in outs]


def load(
    model_dir: str | pathlib.Path,
    *,
    mesh: str = "tp=1",
    dtype: str = "float32",
    compute_dtype: str = "float32",
    rules: Mapping[str, Any] | None = None,
    deployment: str | None = None,
    prefill_mesh: str | None = None,
    decode_mesh: str | None = None,
    decode_steps: int = 8,
    kv_pages: int = 512,
    page_size: int = 16,
    max_decode_batch: int = 16,
    kernels: str = "auto",
    prefix_cache: bool = True,
    prefill_chunk: int | None = 512,
    speculative: str | None = None,
    draft_tp: int = 1,
    compilation_cache_dir: str | pathlib.Path | None = "default",
) -> Model:
    """Load an HF checkpoint directory onto a mesh ("tp=2", "pp=2,tp=2@0-3", ...).

    dtype is the storage dtype of the weights, compute_dtype the dtype of activations; rules maps
    logical axes to mesh axes (default: sharding.DEFAULT_RULES); deployment names a JSON file in
    configs/deployments/ (or a path) that gives both mesh and rules. With prefill_mesh and
    decode_mesh (e.g. "pp=2,tp=2@0-3" and "tp=4@4-7") prefill and decode run on distinct meshes,
    each with its own copy of the weights. kv_pages x page_size is the decode worker's KV capacity
    in tokens; max_decode_batch bounds its continuous batch. kernels="auto" lets decode and prefill on
    one CPU device (float32 compute; float32, bf16 or compressed weights) use infire_jax's own kernels
    (kernels/cpu.py: few-row projections, paged decode attention, causal prefill attention, bf16
    embedding rows); "xla" keeps XLA's code everywhere. prefix_cache keeps finished requests' KV pages
    (prompt and generated tokens) indexed by their tokens, so a prompt that starts with them computes
    only the rest (False: every prompt from position 0, pages freed at once). prefill_chunk bounds the
    prompt tokens of one prefill call: a longer prompt is prefilled in chunks between decode steps
    (None: whole prompts in one call). speculative: speculative decoding ("ngram:4": prompt-lookup
    drafts of up to 4 tokens per step, verified exactly; "draft:DIR:4": a draft checkpoint with the
    same tokenizer, placed on the first draft_tp devices of each decoding mesh with its own KV pages,
    and under P/D beside each prefill mesh too, whose draft KV of the prompt is shipped to decode;
    "eagle3:DIR:4": an EAGLE-3 head in the published layout fed the target's hidden states;
    engine/speculative.py, engine/draft.py, engine/eagle3.py), None = off.
    compilation_cache_dir: JAX's persistent compilation cache,
    every program cached, so a second start compiles nothing ("default": ~/.cache/infire_jax/xla/<cpu>;
    None: leave JAX's own setting; see infire_jax/boot.py)."""
    boot.use_compilation_cache(compilation_cache_dir)  # before this load compiles anything
    model_dir = pathlib.Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if deployment is not None:
        mesh, rules = load_deployment(deployment)
    if (prefill_mesh is None) != (decode_mesh is None):
        raise ValueError("give both prefill_mesh and decode_mesh (disaggregated) or neither (colocated)")
    options = EngineOptions(decode_steps=decode_steps, kv_pages=kv_pages, page_size=page_size, max_decode_batch=max_decode_batch,
                            prefix_cache=prefix_cache, prefill_chunk=prefill_chunk, speculative=speculative,
                            draft_tp=draft_tp)
    prefill, decode = (mesh, mesh) if prefill_mesh is None else (prefill_mesh, decode_mesh)
    return Model(Deployment(
        model_dir, [prefill], [decode], rules=rules, dtype=dtype, compute_dtype=compute_dtype, kernels=kernels,
        options=options,
    ))
