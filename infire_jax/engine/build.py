"""Assembling engines: the one place that turns a model and a deployment into workers and an Engine.

api.load, the batch jobs (engine/batch.py), experiments/serve_offline.py and the multi-process workers
(engine/remote.py) all build through here: `place_programs` places a model on one mesh and wraps it in
its compiled programs, `Deployment` places a model once per distinct mesh spec of its prefill and
decode roles (a spec listed for both roles is one colocated placement), and makes the Engine.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Sequence

from infire_jax import distributed
from infire_jax.config import ModelConfig, load_config
from infire_jax.engine.disagg import ColocatedWorker, DecodeWorker, Engine, PrefillWorker
from infire_jax.engine.draft import DraftModelProposer, check_draft, place_draft
from infire_jax.engine.eagle3 import Eagle3Proposer, PlacedHead, check_head, place_head
from infire_jax.engine.programs import Programs
from infire_jax.engine.speculative import parse_speculative
from infire_jax.loader import dtype_of, make_layout, place_model

__all__ = [
    "EngineOptions", "Deployment", "place_programs", "prefill_draft_tp", "prefill_draft", "prefill_worker", "decode_worker", "colocated_worker", "build_engine",
]


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    """Serving knobs of a deployment's workers.

    decode_steps: tokens per decode dispatch; kv_pages x page_size: each decode worker's KV capacity in
    tokens; max_decode_batch: rows of a decode worker's continuous batch, and of a prefill batch (with
    fewer, a full decode batch arrives in groups and its first and last dispatches run part-empty);
    prefill_max_tokens: padded tokens per prefill batch; prefix_cache: keep finished requests' KV pages
    indexed by their tokens for reuse (kv/manager.py); prefill_chunk: prompt tokens per prefill call
    (a longer prompt is prefilled in chunks between decode steps; None: whole prompts). A prefill
    worker's prefix cache gets kv_pages pages too. speculative: speculative decoding on the decode
    workers ("ngram:K", "draft:DIR:K", "eagle3:DIR:K"; engine/speculative.py parse_speculative), None = off;
    draft_tp: the tensor-parallel size of a draft model ("draft:DIR:K"), placed on the first draft_tp
    devices of each decoding mesh (engine/draft.py)."""

    decode_steps: int = 8
    kv_pages: int = 512
    page_size: int = 16
    max_decode_batch: int = 16
    prefill_max_tokens: int = 8192
    prefix_cache: bool = True
    prefill_chunk: int | None = 512
    speculative: str | None = None
    draft_tp: int = 1

    def __post_init__(self) -> None:
        parse_speculative(self.speculative)  # a bad spec fails here, before anything is placed
        if self.draft_tp < 1:
            raise ValueError(f"draft_tp must be a positive tensor-parallel size, got {self.draft_tp}")
        if self.prefill_chunk is not None and self.prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive number of tokens or None (whole prompts), got {self.prefill_chunk}")


def place_programs(
    model_dir: str | pathlib.Path,
    mesh: str,
    *,
    rules: Mapping[str, Any] | None = None,
    dtype: str = "float32",
    compute_dtype: str = "float32",
    kernels: str = "auto",
    decode_steps: int = 8,
    cfg: ModelConfig | None = None,
) -> Programs:
    """The model placed on one mesh spec, with its compiled programs."""
    placed = place_model(model_dir, make_layout(mesh, rules, kernels), dtype=dtype, compute_dtype=compute_dtype, cfg=cfg)
    return Programs(placed, decode_steps=decode_steps)


def prefill_draft_tp(programs: Programs, options: EngineOptions) -> int | None:
    """The tp of the draft model a prefill worker places beside its mesh for "draft:DIR:K" (so it
    prefills the draft's KV and ships it with the target's): draft_tp, at most the mesh's device
    count; None when the method is not "draft" or the mesh spans processes (then the decode worker
    feeds its draft the prompt itself)."""
    spec = parse_speculative(options.speculative)
    devices = list(programs.layout.mesh.devices.flat)
    if spec is None or spec.method != "draft" or len(distributed.owner_processes(programs.layout.replicated)) > 1:
        return None
    return min(options.draft_tp, len(devices))


def prefill_draft(programs: Programs, options: EngineOptions) -> Programs | None:
    """The draft model placed beside a prefill worker's mesh (prefill_draft_tp; placed as a decoding
    worker's own is by `_proposer`, so their KV specs agree), or None."""
    tp = prefill_draft_tp(programs, options)
    return None if tp is None else place_draft(parse_speculative(options.speculative).path, programs, tp=tp)


def prefill_worker(name: str, programs: Programs, options: EngineOptions, draft: Programs | None = None) -> PrefillWorker:
    """draft: the draft model placed beside this mesh (prefill_draft_tp), whose KV it prefills and ships.
    With "eagle3:DIR:K" the prefill calls capture the head's target layers and ship the prompt's states."""
    spec = parse_speculative(options.speculative)
    capture = check_head(spec.path, programs.placed.cfg).aux_layers if spec is not None and spec.method == "eagle3" else ()
    return PrefillWorker(
        name, programs, max_batch=options.max_decode_batch, max_batch_tokens=options.prefill_max_tokens,
        num_pages=options.kv_pages, page_size=options.page_size, prefill_chunk=options.prefill_chunk,
        prefix_cache=options.prefix_cache, draft=None if draft is None else DraftModelProposer(
            draft, num_pages=options.kv_pages, page_size=options.page_size, max_batch=options.max_decode_batch,
            chunk=options.prefill_chunk or 512), capture=capture,
    )


def _proposer(programs: Programs, options: EngineOptions, draft: Programs | PlacedHead | None
              ) -> DraftModelProposer | Eagle3Proposer | None:
    """The decoding worker's model-based proposer, if its speculative method has one (else the
    Speculator's n-gram lookup). draft: the draft model or EAGLE-3 head already placed for this mesh
    (else placed here)."""
    spec = parse_speculative(options.speculative)
    if spec is None or spec.method == "ngram":
        return None
    if spec.method == "eagle3":
        return Eagle3Proposer(draft or place_head(spec.path, programs), programs, num_pages=options.kv_pages,
                              page_size=options.page_size, max_batch=options.max_decode_batch, k=spec.k,
                              chunk=options.prefill_chunk or 512)
    draft = draft or place_draft(spec.path, programs, tp=options.draft_tp)
    return DraftModelProposer(draft, num_pages=options.kv_pages, page_size=options.page_size,
                              max_batch=options.max_decode_batch, chunk=options.prefill_chunk or 512)


def decode_worker(name: str, programs: Programs, options: EngineOptions, draft: Programs | PlacedHead | None = None
                  ) -> DecodeWorker:
    return DecodeWorker(
        name, programs, num_pages=options.kv_pages, page_size=options.page_size, max_batch=options.max_decode_batch,
        steps=options.decode_steps, prefix_cache=options.prefix_cache,
        speculative=parse_speculative(options.speculative), proposer=_proposer(programs, options, draft),
    )


def colocated_worker(name: str, programs: Programs, options: EngineOptions, draft: Programs | PlacedHead | None = None
                     ) -> ColocatedWorker:
    return ColocatedWorker(
        name, programs, num_pages=options.kv_pages, page_size=options.page_size, max_batch=options.max_decode_batch,
        steps=options.decode_steps, prefill_chunk=options.prefill_chunk, prefix_cache=options.prefix_cache,
        max_batch_tokens=options.prefill_max_tokens, speculative=parse_speculative(options.speculative),
        proposer=_proposer(programs, options, draft),
    )


class Deployment:
    """A model placed for a set of prefill and decode meshes (each distinct spec once)."""

    def __init__(
        self,
        model_dir: str | pathlib.Path,
        prefill_meshes: Sequence[str],
        decode_meshes: Sequence[str],
        *,
        rules: Mapping[str, Any] | None = None,
        dtype: str = "float32",
        compute_dtype: str = "float32",
        kernels: str = "auto",
        options: EngineOptions = EngineOptions(),
    ):
        if not prefill_meshes or not decode_meshes:
            raise ValueError("a deployment needs at least one prefill mesh and one decode mesh")
        dtype_of(dtype), dtype_of(compute_dtype)
        self.model_dir = pathlib.Path(model_dir)
        self.cfg = load_config(self.model_dir)
        self.options = options
        spec = parse_speculative(options.speculative)
        if spec is not None and spec.method == "draft":  # an incompatible draft fails before anything is placed
            check_draft(self.cfg, load_config(spec.path), self.model_dir, pathlib.Path(spec.path))
        if spec is not None and spec.method == "eagle3":  # likewise an incompatible EAGLE-3 head
            check_head(spec.path, self.cfg)
        self.prefill_meshes, self.decode_meshes = list(prefill_meshes), list(decode_meshes)
        self._place = dict(rules=rules, dtype=dtype, compute_dtype=compute_dtype, kernels=kernels)
        specs = list(dict.fromkeys(self.prefill_meshes + self.decode_meshes))
        layouts = {s: make_layout(s, rules, kernels) for s in specs}
        distributed.check_meshes([layouts[s].mesh for s in specs], specs)  # multi-process: every device, before any work
        devices = {s: {d.id for d in layouts[s].mesh.devices.flat} for s in specs}
        for i, a in enumerate(specs):
            for b in specs[i + 1 :]:
                if devices[a] & devices[b]:
                    raise ValueError(
                        f"meshes {a!r} and {b!r} share devices {sorted(devices[a] & devices[b])}; give distinct "
                        "placements disjoint device ranges (e.g. '@0-3' and '@4-7'), or list the same spec for "
                        "both roles to colocate them"
                    )
        self._programs: dict[str, Programs] = {}
        for s in specs:
            self._programs[s] = place_programs(
                self.model_dir, s, **self._place, decode_steps=options.decode_steps, cfg=self.cfg
            )
        self._drafts: dict[tuple, Programs | PlacedHead] = {}  # (decode mesh, draft dir[, tp]) -> placed draft / head

    def programs(self, mesh: str) -> Programs:
        return self._programs[mesh]

    def draft(self, mesh: str, options: EngineOptions, tp: int | None = None) -> Programs | PlacedHead | None:
        """The draft model of options.speculative ("draft:DIR:K") placed beside the mesh (decoding, or
        prefill with tp = prefill_draft_tp), once per (mesh, draft, tp), or the EAGLE-3 head
        ("eagle3:DIR:K") placed on the decoding mesh's layout once per (mesh, head); None for n-gram lookup."""
        spec = parse_speculative(options.speculative)
        if spec is None or spec.method == "ngram":
            return None
        if spec.method == "eagle3":
            key = (mesh, spec.path)
            if key not in self._drafts:
                self._drafts[key] = place_head(spec.path, self._programs[mesh])
            return self._drafts[key]
        tp = tp or options.draft_tp
        key = (mesh, spec.path, tp)
        if key not in self._drafts:
            self._drafts[key] = place_draft(spec.path, self._programs[mesh], tp=tp)
        return self._drafts[key]

    def _prefill_draft(self, mesh: str, options: EngineOptions) -> Programs | None:
        tp = prefill_draft_tp(self._programs[mesh], options)
        return None if tp is None else self.draft(mesh, options, tp)

    @property
    def colocated(self) -> bool:
        """One placement serves both roles."""
        return self.prefill_meshes == self.decode_meshes and len(self._programs) == 1

    def engine(self, options: EngineOptions | None = None) -> Engine:
        """A new Engine over this deployment's placements (workers named role index : mesh): colocated
        workers (one per mesh) when both roles list the same meshes, else prefill and decode workers.
        options: other serving knobs than the deployment's (decode_steps stays the programs')."""
        o = options or self.options
        if self.prefill_meshes == self.decode_meshes:
            return Engine([], [colocated_worker(f"colocated{i}:{s}", self._programs[s], o, self.draft(s, o))
                               for i, s in enumerate(self.decode_meshes)])
        prefill = [prefill_worker(f"prefill{i}:{s}", self._programs[s], o, self._prefill_draft(s, o))
                   for i, s in enumerate(self.prefill_meshes)]
        decode = [decode_worker(f"decode{i}:{s}", self._programs[s], o, self.draft(s, o))
                  for i, s in enumerate(self.decode_meshes)]
        return Engine(prefill, decode)


def build_engine(
    model_dir: str | pathlib.Path, prefill_meshes: Sequence[str], decode_meshes: Sequence[str], **kwargs: Any
) -> Engine:
    """An Engine for a deployment (see Deployment for the arguments)."""
    return Deployment(model_dir, prefill_meshes, decode_meshes, **kwargs).engine()
