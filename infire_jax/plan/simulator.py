"""Roofline step costs and a discrete-event simulator of prefill / decode clusters.

Step cost (CostModel.stage_time), per device of one pipeline stage, from the per-device shards of
the real model (capacity.AbstractModel) and the hardware:

  flops  = 2 * dense_elems * N + 2 * (k / E) * expert_elems * N          (linear layers, N tokens)
         + 2 * head_elems * R                                            (LM head, R rows with logits)
         + sum over layer types of layers_t * attn_t * positions_t       (QK and PV per key position)
  bytes  = dense_bytes + expert_bytes * (1 - (1 - k / E) ** N)           (the distinct experts the N
                                                                          tokens touch, uniform routing)
         + sum over layer types of layers_t * kv_t * cached positions read (chunked layers capped)
  time   = max(flops / (peak * flops_eff), bytes / (bw * bw_eff))
         + layers * (all-reduces per layer) * (latency + 2 (g-1)/g * N * D * act_bytes / link_bw)
         + step overhead + layers * layer overhead

Instances (each a mesh with its own pp / tp / ep, built as a CapacityPlan for its role):
  decode   one token for every running row per iteration; with pp the rows form pp microbatches
           in flight, so an iteration (= time per output token) is pp stage times of rows / pp;
  prefill  chunked: each iteration takes up to `chunk` prompt tokens from the queue (several short
           prompts, or a slice of a long one, attending to its earlier slices); with pp, chunks are
           pipelined (the instance is busy one stage time per chunk, a chunk finishes pp stage
           times after it starts);
  colocated  chunked prefill mixed with decode (vLLM's scheduler): every running row decodes and
           the rest of the `chunk` token budget goes to prompts, so long prompts slow the decode
           rows down (the interference disaggregation removes).
A finished prefill sends its KV (canonical bytes of the prompt) to the decode instance with the
most free cache: NVLink when both instances fit in one node, else the network, one stream per
device of the smaller instance. Requests reserve their whole KV (prompt + output, chunked layers
capped) when they join a decode batch; one that can never fit is rejected (counts as a miss).

Agent sessions (AgentWorkload): multi-turn conversations whose turns resend everything before them;
every instance keeps finished turns' KV as a prefix cache in the memory its running requests leave,
a turn's cached prefix is not prefilled, P -> D ships only the pages decode lacks, and routing may
follow the cache (session affinity); see simulate().

Metrics: TTFT = first token (end of prefill) - arrival; TPOT = (last token - first token) /
(output - 1). Goodput = the highest Poisson arrival rate at which >= 90% of requests meet both
SLOs (bisection), per GPU = / GPUs the plan uses. Cost per million input / output tokens at a
rate (SimResult.usd_per_mtok): the plan's GPU-hours at a $/GPU-hour (plan/prices.py), split between
prompt and generated tokens by the GPU time prefill and decode take.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
import math
from typing import Any, Callable, Sequence

import numpy as np

from infire_jax.plan.capacity import CapacityPlan, Deployment, PlanError, load_hf_config, moe_dims, plan_capacity
from infire_jax.plan.hardware import GiB, Hardware, get_hardware

__all__ = [
    "CostModel",
    "StepCollective",
    "Workload",
    "WORKLOADS",
    "Request",
    "InstanceSpec",
    "ClusterPlan",
    "simulate",
    "goodput",
    "search",
    "SimResult",
    "AgentWorkload",
    "Turn",
    "affinity_effect",
    "routed",
    "candidate_plans",
    "throughput_bound",
]


# ------------------------------------------------------------------------------------------------
# Step costs
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepCollective:
    """A collective the cost model charges: `count` executions of `bytes` (per device, the message
    each one carries) over a group of `group` devices along mesh `axes`; each costs one collective
    latency + wire_factor * bytes / link_bw (ring all-reduce: 2 (g-1)/g)."""

    kind: str
    what: str
    axes: tuple[str, ...]
    group: int
    count: float
    bytes: float
    wire_factor: float
    link_bw: float

    @property
    def total_bytes(self) -> float:
        return self.count * self.bytes


def _rule_axes(am: Any, logical: str) -> tuple[str, ...]:
    axes = am.rules.get(logical)
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if am.mesh_shape[a] > 1)


class CostModel:
    """Roofline time of one pipeline stage's step on one device of a planned mesh."""

    def __init__(self, plan: CapacityPlan, hardware: Hardware | None = None):
        hw = hardware or plan.hardware
        am = plan.abstract
        cfg = am.cfg
        self.plan, self.hw, self.cfg = plan, hw, cfg
        self.pp = am.mesh_shape["pp"]
        self.devices = am.devices
        self.stage_devices = self.devices // self.pp
        self.act_bytes = 2 if hw.compute_dtype == "bfloat16" else 4
        m = moe_dims(am)
        self.experts, self.top_k = m.experts, m.top_k
        dense_b = expert_b = layer_b = 0.0
        dense_e = expert_e = head_e = 0.0
        for p in am.params:
            name = p.path[-1]
            if name.endswith("_shape"):
                continue
            elems = math.prod(p.shard_shape) * (8 if name.endswith("_packed") else 1)
            if p.kind == "routed_expert":
                expert_b += p.bytes_per_device
                if not name.endswith("_scale"):
                    expert_e += elems
                continue
            if p.kind == "embedding":
                if cfg.tie_word_embeddings:  # the embedding is the LM head
                    dense_b += p.bytes_per_device
                    head_e += elems
                continue  # a gather of a few rows otherwise
            dense_b += p.bytes_per_device
            if p.logical_axes[:1] == ("layers",):
                layer_b += p.bytes_per_device
            if p.kind == "lm_head":
                head_e += elems
            elif p.kind != "norm":
                dense_e += elems
        self.dense_bytes, self.expert_bytes = dense_b, expert_b
        self.layer_bytes = layer_b  # stacked per-layer weights other than routed experts
        self.dense_elems, self.expert_elems, self.head_elems = dense_e, expert_e, head_e
        # layers and KV of the bottleneck stage, per layer type
        self.layers = dict(plan.kv_layers_per_device)
        self.n_layers = sum(self.layers.values())
        self.kv_per_layer = dict(plan.kv_bytes_per_token_per_layer)
        self.chunk = plan.chunk_size
        h = cfg.num_heads
        hl = h / am.axis_ways("heads", h)
        if cfg.get("kv_lora_rank"):
            r, rope = cfg.get("kv_lora_rank"), cfg.get("qk_rope_head_dim")
            nope, v = cfg.get("qk_nope_head_dim"), cfg.get("v_head_dim")
            self.attn_decode = 2 * hl * (r + rope) + 2 * hl * r  # absorbed: latent scores + latent values
            self.attn_prefill = 2 * hl * (nope + rope) + 2 * hl * v  # expanded per-head keys / values
            self.expand_per_prefix = 2 * hl * (nope + v) * r  # expanding cached latents for a chunk
        else:
            self.attn_decode = self.attn_prefill = 4 * hl * cfg.head_dim
            self.expand_per_prefix = 0.0
        # collectives per layer: attention output over tp, FFN output over the ways the FFN splits
        # (group size, the mesh axes of the group, what it reduces)
        tp = am.axis_ways("heads", h)
        ffn_ways = am.axis_ways("mlp", cfg.intermediate_size)
        self.ar_groups: list[tuple[int, tuple[str, ...], str]] = []
        if tp > 1:
            self.ar_groups.append((tp, _rule_axes(am, "heads"), "attention output"))
        moe_ways = am.mesh_shape["tp"] * am.mesh_shape["ep"]
        if m.experts and moe_ways > 1:
            self.ar_groups.append((moe_ways, tuple(a for a in ("ep", "tp") if am.mesh_shape[a] > 1), "MoE output"))
        elif not m.experts and ffn_ways > 1:
            self.ar_groups.append((ffn_ways, _rule_axes(am, "mlp"), "MLP output"))
        self.link = hw.link_bw if self.stage_devices <= hw.devices_per_node else hw.network_bw
        self.p2p_link = hw.link_bw if self.devices <= hw.devices_per_node else hw.network_bw
        self.d = cfg.hidden_size
        self.peak = hw.flops * hw.flops_efficiency
        self.bw = hw.hbm_bw * hw.bw_efficiency

    # -- pieces ----------------------------------------------------------------------------
    def touched(self, tokens: float) -> float:
        """Expected fraction of a layer's experts that `tokens` tokens route to (uniform routing)."""
        if not self.experts:
            return 0.0
        return 1.0 - (1.0 - self.top_k / self.experts) ** max(tokens, 0.0)

    def collectives(self, tokens: float) -> list[StepCollective]:
        """What one device of the bottleneck stage sends while its stage runs `tokens` tokens: an
        all-reduce of the hidden states per layer and group (attention output over tp, FFN output
        over the ways the FFN splits), and with pp the hidden states handed to the next stage."""
        msg = tokens * self.d * self.act_bytes
        out = [StepCollective("all-reduce", what, axes, g, self.n_layers, msg, 2.0 * (g - 1) / g, self.link)
               for g, axes, what in self.ar_groups]
        if self.pp > 1:
            out.append(StepCollective("send", "hidden states to the next stage", ("pp",), 2, 1, msg, 1.0, self.p2p_link))
        return out

    def decode_collectives(self, batch: int) -> list[StepCollective]:
        """Collectives per device for one decode step of `batch` rows (pp microbatches of batch / pp
        rows each pass through every stage: counts x pp, as decode_step's time)."""
        return [dataclasses.replace(c, count=c.count * self.pp) for c in self.collectives(batch / self.pp)]

    def comm_time(self, tokens: float) -> float:
        lat = self.hw.collective_latency_s
        return sum(c.count * (lat + c.wire_factor * c.bytes / c.link_bw) for c in self.collectives(tokens))

    def _ctx_terms(self, ctx_full: float, ctx_capped: float) -> tuple[float, float]:
        """(attention FLOPs per unit coefficient, KV bytes) for summed key positions."""
        pos = kv = 0.0
        for t, n in self.layers.items():
            c = ctx_capped if t == "chunked" else ctx_full
            pos += n * c
            kv += n * self.kv_per_layer[t] * c
        return pos, kv

    def stage_time(
        self,
        tokens: float,
        logit_rows: float,
        dec_ctx_full: float = 0.0,
        dec_ctx_capped: float = 0.0,
        pf_pairs_full: float = 0.0,
        pf_pairs_capped: float = 0.0,
        pf_prefix_full: float = 0.0,
        pf_prefix_capped: float = 0.0,
        detail: bool = False,
    ) -> Any:
        """Seconds for one stage to run `tokens` tokens: decode rows with summed contexts dec_ctx_*
        (keys read per row), prefill query-key pairs pf_pairs_* and cached prefix positions pf_prefix_*
        (read once per chunk); `*_capped` are the same with chunked-attention layers' windows."""
        lin = 2.0 * (self.dense_elems + self.expert_elems * (self.top_k / self.experts if self.experts else 0.0)) * tokens
        head = 2.0 * self.head_elems * logit_rows
        dpos, dkv = self._ctx_terms(dec_ctx_full, dec_ctx_capped)
        ppos, _ = self._ctx_terms(pf_pairs_full, pf_pairs_capped)
        xpos, xkv = self._ctx_terms(pf_prefix_full, pf_prefix_capped)
        attn = self.attn_decode * dpos + self.attn_prefill * ppos + self.expand_per_prefix * xpos
        flops = lin + head + attn
        nbytes = self.dense_bytes + self.expert_bytes * self.touched(tokens) + dkv + xkv
        if self.hw.matmul_rates:  # measured rate by rows (this CPU): the linear layers run at m = tokens
            t_c = (lin / self.hw.matmul_rate(tokens) + head / self.hw.matmul_rate(logit_rows)
                   + attn / self.hw.attention_rate(max(tokens, 1)))
        else:
            t_c = flops / self.peak
        t_m = nbytes / self.bw
        t_comm = self.comm_time(tokens)
        t_extra = self.hw.weight_passes * self.layer_bytes / self.bw if self.hw.weight_passes else 0.0
        t = max(t_c, t_m) + t_comm + t_extra + self.hw.step_overhead_s + self.n_layers * self.hw.layer_overhead_s
        if detail:
            return dict(time=t, compute=t_c, memory=t_m, comm=t_comm, extra=t_extra, flops=flops, bytes=nbytes,
                        bound="compute" if t_c > t_m else "memory")
        return t

    # -- whole steps -----------------------------------------------------------------------
    def decode_step(self, batch: int, context: float, detail: bool = False) -> Any:
        """Time per output token for `batch` rows at mean context `context` (pp microbatches in flight)."""
        rows = batch / self.pp
        capped = min(context, self.chunk) if self.chunk else context
        st = self.stage_time(rows, rows, rows * context, rows * capped, detail=detail)
        if detail:
            return {k: (v * self.pp if k in ("time", "compute", "memory", "comm") else v) for k, v in st.items()}
        return self.pp * st

    def prefill_time(self, prompt: int, chunk: int) -> float:
        """Latency of prefilling one prompt alone in chunks of `chunk` tokens (pp: stages in sequence)."""
        t, done = 0.0, 0
        while done < prompt:
            c = min(chunk, prompt - done)
            t += self.stage_time(c, 1, **self.chunk_terms(done, c))
            done += c
        return t * self.pp

    def chunk_terms(self, offset: int, c: int) -> dict[str, float]:
        """Attention terms of a prefill slice of c tokens after `offset` cached tokens."""
        pairs = c * (offset + (c + 1) / 2.0)
        if self.chunk:
            # chunked layers: each query sees at most the tokens of its own window
            cap = self.chunk
            pairs_c = c * min(offset + (c + 1) / 2.0, cap / 2.0 + 0.5) if offset + c > cap else pairs
            prefix_c = min(offset, cap)
        else:
            pairs_c, prefix_c = pairs, offset
        return dict(pf_pairs_full=pairs, pf_pairs_capped=pairs_c, pf_prefix_full=offset, pf_prefix_capped=prefix_c)


# ------------------------------------------------------------------------------------------------
# Workloads
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """Prompt / output lengths as clipped log-normals (median, sigma, min, max) and default SLOs."""

    name: str
    prompt: tuple[float, float, int, int]
    output: tuple[float, float, int, int]
    ttft_slo: float  # seconds
    tpot_slo: float  # seconds
    description: str = ""

    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)

        def draw(spec):
            med, sigma, lo, hi = spec
            return np.clip(np.round(med * np.exp(sigma * rng.standard_normal(n))), lo, hi).astype(np.int64)

        return draw(self.prompt), draw(self.output)

    def means(self, n: int = 20000) -> tuple[float, float]:
        return _means(self, n)


@functools.lru_cache(maxsize=64)
def _means(w: Workload, n: int) -> tuple[float, float]:
    p, o = w.sample(n, seed=12345)
    return float(p.mean()), float(o.mean())


WORKLOADS: dict[str, "Workload | AgentWorkload"] = {
    "chat": Workload(
        "chat", prompt=(600, 1.0, 32, 8192), output=(250, 0.7, 16, 2048), ttft_slo=2.0, tpot_slo=0.060,
        description="chatbot: short prompts (median 600 tokens), medium answers (median 250); SLO TTFT 2 s, TPOT 60 ms",
    ),
    "rag": Workload(
        "rag", prompt=(12000, 0.35, 4000, 32000), output=(200, 0.5, 32, 1024), ttft_slo=8.0, tpot_slo=0.020,
        description="long-context RAG: prompts median 12k tokens, short answers (median 200); SLO TTFT 8 s, tight TPOT 20 ms",
    ),
}


def _draw(rng: np.random.Generator, spec: tuple[float, float, int, int], n: int) -> np.ndarray:
    med, sigma, lo, hi = spec
    return np.clip(np.round(med * np.exp(sigma * rng.standard_normal(n))), lo, hi).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class Turn:
    prompt: int  # the whole conversation so far (what the turn sends)
    output: int
    gap: float  # seconds from this turn's last token to the session's next turn


@dataclasses.dataclass(frozen=True)
class AgentWorkload:
    """Multi-turn agent sessions, the shape of issue 20's trace generator (experiments/agent_trace.py):
    S sessions x T turns; turn 1 sends a system prompt shared by every session + the first user
    message, turn k sends turn k-1's prompt and answer + a tool output + a new user message.
    Sessions arrive as a Poisson process (the simulated rate is sessions/s); a session's next turn
    arrives `gap` seconds after its previous answer ends (the tool runs on that answer), so a
    session's turns never overlap. Lengths are clipped log-normals (median, sigma, min, max), the
    gap a log-normal (median s, sigma); a session ends early where its context would pass
    max_context. Most of a turn's prompt was sent one turn ago: whether it is still cached where
    the turn lands decides its prefill work (see simulate)."""

    name: str = "agent"
    turns: int = 8
    system_tokens: int = 6000
    first_user: tuple[float, float, int, int] = (600, 0.6, 50, 4000)
    tool: tuple[float, float, int, int] = (1200, 1.0, 20, 16000)
    user: tuple[float, float, int, int] = (60, 0.8, 5, 1000)
    output: tuple[float, float, int, int] = (300, 0.8, 16, 4096)
    gap: tuple[float, float] = (3.0, 0.7)
    max_context: int = 131072
    ttft_slo: float = 10.0
    tpot_slo: float = 0.050
    description: str = ""

    def sessions(self, n: int, seed: int = 0) -> list[list[Turn]]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            first = int(_draw(rng, self.first_user, 1)[0])
            tools, users, outs = (_draw(rng, spec, self.turns) for spec in (self.tool, self.user, self.output))
            gaps = self.gap[0] * np.exp(self.gap[1] * rng.standard_normal(self.turns))
            prompt, turns = self.system_tokens + first, []
            for k in range(self.turns):
                if k:
                    prompt += int(outs[k - 1] + tools[k] + users[k])
                if prompt + outs[k] > self.max_context:
                    break
                turns.append(Turn(prompt, int(outs[k]), float(gaps[k])))
            out.append(turns)
        return out

    def means(self, n: int = 2000) -> tuple[float, float]:
        """Mean prompt and output tokens per turn."""
        return _agent_means(self, n)[:2]

    def session_seconds(self) -> float:
        """A session's expected life with answers at the TPOT SLO: its turns' outputs and gaps."""
        _, mo = self.means()
        turns = _agent_means(self, 2000)[3]
        return turns * (mo * self.tpot_slo + self.gap[0] * math.exp(self.gap[1] ** 2 / 2))

    def new_tokens_mean(self, n: int = 2000) -> float:
        """Mean tokens per turn that its session's previous turn did not send or produce (all of
        turn 1 except the system prompt): the prefill work per turn with a perfect cache."""
        return _agent_means(self, n)[2]

    def mean_turns(self) -> float:
        return _agent_means(self, 2000)[3]


@functools.lru_cache(maxsize=16)
def _agent_means(w: AgentWorkload, n: int) -> tuple[float, float, float, float]:
    prompt, output, new = [], [], []
    sessions = w.sessions(n, seed=12345)
    for session in sessions:
        prev = w.system_tokens
        for t in session:
            prompt.append(t.prompt)
            output.append(t.output)
            new.append(t.prompt - prev)
            prev = t.prompt + t.output
    return float(np.mean(prompt)), float(np.mean(output)), float(np.mean(new)), len(prompt) / len(sessions)


WORKLOADS["agent"] = AgentWorkload(
    description="coding agent: 8-turn sessions over a shared 6k-token system prompt, each turn adding a tool output "
                "(median 1,200 tokens) and a user message (median 60) to the conversation; answers median 300 tokens, "
                "3 s of tool time between turns; SLO TTFT 10 s, TPOT 50 ms",
)


# ------------------------------------------------------------------------------------------------
# Cluster plans
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class InstanceSpec:
    role: str  # prefill / decode / colocated
    mesh: str
    count: int  # instances of this kind
    chunk: int  # token budget per iteration (prefill / colocated)
    max_batch: int
    cost: CostModel = dataclasses.field(repr=False)
    capacity: CapacityPlan = dataclasses.field(repr=False)
    # 0: continuous batching with fused iterations (vLLM's scheduler, module doc). k > 0: this
    # project's engine loop (engine/core.py): a step is one prefill call (whole prompts batched up to
    # `chunk` tokens and padded to powers of two, or the next chunk of each prompt in progress), then
    # one decode call of k tokens for every running row (1 while an admitted prompt is incomplete),
    # batch padded to a power of two; a request arriving meanwhile waits for the step to end.
    call_steps: int = 0
    max_batch_tokens: int = 8192  # engine loop: padded tokens of one whole-prompt prefill call
    page_size: int = 1  # prefix caches reuse whole pages of this many tokens

    @property
    def devices(self) -> int:
        return self.cost.devices

    def describe(self) -> dict[str, Any]:
        return dict(role=self.role, mesh=self.capacity.mesh, instances=self.count, devices_each=self.devices,
                    chunk=self.chunk, max_batch=self.max_batch,
                    kv_free_gib_per_device=round(self.capacity.kv_free_per_device / GiB, 2))


@dataclasses.dataclass
class ClusterPlan:
    instances: list[InstanceSpec]

    @property
    def disaggregated(self) -> bool:
        return any(i.role == "prefill" for i in self.instances)

    @property
    def gpus(self) -> int:
        return sum(i.devices * i.count for i in self.instances)

    def describe(self) -> dict[str, Any]:
        kinds = {i.role: i for i in self.instances}
        if self.disaggregated:
            p, d = kinds["prefill"], kinds["decode"]
            label = f"{p.count}P[{p.capacity.mesh}] : {d.count}D[{d.capacity.mesh}]"
        else:
            c = kinds["colocated"]
            label = f"{c.count}x colocated[{c.capacity.mesh}] chunk {c.chunk}"
        return dict(label=label, gpus=self.gpus, disaggregated=self.disaggregated,
                    instances=[i.describe() for i in self.instances])


# ------------------------------------------------------------------------------------------------
# The discrete-event simulation
# ------------------------------------------------------------------------------------------------


class Request:
    __slots__ = ("id", "arrival", "prompt", "output", "t_first", "t_done", "done_prefill", "rejected", "kv",
                 "session", "turn", "cached", "kv_prefill", "xfer_tokens", "turn_submitted")

    def __init__(self, i: int, arrival: float, prompt: int, output: int, session: int | None = None, turn: int = 0):
        self.id, self.arrival, self.prompt, self.output = i, arrival, int(prompt), int(output)
        self.t_first = self.t_done = None
        self.done_prefill = 0
        self.rejected = False
        self.kv = 0.0
        self.session, self.turn = session, turn
        self.cached = 0  # prompt tokens found in a prefix cache (not prefilled)
        self.kv_prefill = 0.0  # bytes a prefill instance holds while the prompt is prefilled (sessions)
        self.xfer_tokens = 0  # prompt tokens whose KV crossed from prefill to decode
        self.turn_submitted: float | None = None  # engine loop: when the loop took the request


class _Sim:
    def __init__(self):
        self.heap: list = []
        self.seq = 0
        self.now = 0.0

    def at(self, t: float, fn: Callable, *args) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, fn, args))

    def next_time(self) -> float:
        return self.heap[0][0] if self.heap else math.inf

    def run(self) -> None:
        while self.heap:
            t, _, fn, args = heapq.heappop(self.heap)
            self.now = t
            fn(*args)


SYSTEM = "system"  # the prefix cache key of the system prompt every session starts with


class _PrefixCache:
    """KV an instance keeps after requests finish: per session the conversation so far (LRU order),
    and the system prompt all sessions share (its pages counted once: a session's entry counts only
    what lies past it). Entries are evicted least recently used first when running requests need
    the memory; a request that reuses an entry takes it over (its pages become the request's)."""

    def __init__(self, seq_bytes: Callable[[float], float], system_tokens: int, page: int = 1):
        self.seq_bytes, self.system, self.page = seq_bytes, system_tokens, page
        self.entries: collections.OrderedDict[Any, int] = collections.OrderedDict()
        self.sizes: dict[Any, float] = {}
        self.bytes = 0.0
        self.evicted_tokens = 0
        self.system_written = 0  # engine loop: tokens of the shared system prompt prefilled so far

    def hit(self, r: Request) -> int:
        """Prompt tokens of r this cache holds (at most prompt - 1: the last token is computed)."""
        if r.session in self.entries:
            held = self.entries[r.session]
        elif self.system and SYSTEM in self.entries:
            held = self.system
        elif self.system_written:  # the part of the system prompt whose pages are written already
            held = self.system_written
        else:
            return 0
        return max(0, min(held, r.prompt - 1)) // self.page * self.page  # whole pages are reused

    def take(self, r: Request) -> int:
        """hit(r), and the session's entry leaves the cache (r now owns those pages); the shared
        system prompt stays (refreshed)."""
        n = self.hit(r)
        if r.session in self.entries:
            self.bytes -= self.sizes.pop(r.session)
            del self.entries[r.session]
        if self.system and SYSTEM in self.entries:
            self.entries.move_to_end(SYSTEM)
        return n

    def put_system(self, tokens: int) -> None:
        """`tokens` of a prompt (which starts with the shared system prompt) have their pages written
        and indexed: that much of the system prompt is reusable (the engine indexes chunk by chunk)."""
        if not self.system:
            return
        self.system_written = max(self.system_written, min(tokens, self.system))
        if self.system_written >= self.system and SYSTEM not in self.entries:
            self.entries[SYSTEM] = self.system
            self.sizes[SYSTEM] = self.seq_bytes(self.system)
            self.bytes += self.sizes[SYSTEM]

    def put(self, session: Any, tokens: int) -> None:
        """Keep `tokens` of the session's conversation (and the shared system prompt)."""
        if self.system and SYSTEM not in self.entries:
            self.entries[SYSTEM] = self.system
            self.sizes[SYSTEM] = self.seq_bytes(self.system)
            self.bytes += self.sizes[SYSTEM]
        if session in self.entries:
            self.bytes -= self.sizes[session]
        size = max(0.0, self.seq_bytes(tokens) - (self.seq_bytes(self.system) if self.system else 0.0))
        self.entries[session], self.sizes[session] = tokens, size
        self.entries.move_to_end(session)
        self.bytes += size
        if self.system:
            self.entries.move_to_end(SYSTEM)

    def evict_one(self) -> bool:
        if not self.entries:
            return False
        key, tokens = self.entries.popitem(last=False)
        self.bytes -= self.sizes.pop(key)
        self.evicted_tokens += tokens
        if key == SYSTEM:
            self.system_written = 0
        return True


def _pow2(n: float, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum) (the engine's padded shapes)."""
    return max(minimum, 1 << max(0, int(math.ceil(n)) - 1).bit_length())


class _Processor:
    """One processor that several instances' engine loops share (this engine's workers in one
    process): their steps run one at a time, in turn."""

    def __init__(self) -> None:
        self.owner: Any = None
        self.waiting: list[Any] = []
        self.step_end = 0.0

    def wait(self, x: Any) -> None:
        if x not in self.waiting:
            self.waiting.append(x)


class _Instance:
    """One instance (prefill, decode or colocated) with its queue and running rows; with sessions
    (AgentWorkload) also its prefix cache, which lives in the KV memory running requests leave."""

    def __init__(self, sim: _Sim, spec: InstanceSpec, on_prefilled: Callable | None, on_done: Callable,
                 system_tokens: int | None = None):
        self.sim, self.spec, self.cost = sim, spec, spec.cost
        self.pp = spec.cost.pp
        self.on_prefilled, self.on_done = on_prefilled, on_done
        self.kv_capacity = max(0.0, spec.capacity.kv_free_per_device)
        self.kv_used = 0.0
        self.waiting: list[Request] = []  # prefill queue (prefill / colocated) or KV-ready queue (decode)
        self.prefilling: list[Request] = []  # admitted, prompt not finished (colocated / prefill)
        self.rows: list[Request] = []
        self.ctx = np.zeros(0, np.int64)
        self.rem = np.zeros(0, np.int64)
        self.busy = False
        self.outstanding = 0.0  # tokens queued (router load)
        self.chunk_cap = spec.capacity.chunk_size
        self.version = 0  # bumped when a fast-forwarded decode run is cut short
        self.ff: tuple[float, float, int] | None = None  # (start, step time, steps) of the running decode run
        self._kv_need: dict[int, float] = {}
        self.cache = (_PrefixCache(spec.capacity.seq_bytes_per_device, system_tokens, spec.page_size)
                      if system_tokens is not None else None)
        self.busy_prefill = self.busy_decode = 0.0  # seconds of work, for the cost split
        self.proc: _Processor | None = None  # the processor this instance shares with others (one engine loop)
        self.step_end = 0.0  # engine loop: when the step under way ends
        self.jitter: np.random.Generator | None = None  # engine loop: draws call times (Hardware.call_time_spread)
        self.between_steps = False  # engine loop: a step ended, the next one starts once this instant's events ran

    # -- KV accounting ------------------------------------------------------------------------
    def kv_need(self, r: Request) -> float:
        need = self._kv_need.get(r.id)
        if need is None:
            need = self._kv_need[r.id] = self.spec.capacity.seq_bytes_per_device(r.prompt + r.output)
        return need

    def free_kv(self) -> float:
        """KV bytes not held by running requests (cached prefixes count as free: they are evictable)."""
        return self.kv_capacity - self.kv_used

    def _make_room(self, need: float) -> bool:
        """Whether `need` bytes fit beside the running requests, evicting cached prefixes (LRU) for it."""
        if need > self.free_kv():
            return False
        while self.cache is not None and need > self.free_kv() - self.cache.bytes:
            self.cache.evict_one()
        return True

    def _finish_kv(self, r: Request, kv: float, keep_tokens: int) -> None:
        """r's pages leave the running set; with sessions they stay cached as its conversation."""
        self.kv_used -= kv
        if self.cache is not None and r.session is not None:
            self.cache.put(r.session, keep_tokens)

    # -- entry points -------------------------------------------------------------------------
    def submit(self, r: Request) -> None:
        if self.spec.call_steps and r.turn_submitted is None:
            # the engine loop takes requests between steps: a request is submitted (its TTFT starts)
            # when the step under way ends, as the replay driving the real engine does
            busy_until = max(self.step_end, self.proc.step_end if self.proc is not None else 0.0)
            r.arrival = r.turn_submitted = max(r.arrival, busy_until)
        if self.spec.role != "prefill" and self.kv_need(r) > self.kv_capacity:
            r.rejected = True
            r.t_first = r.t_done = math.inf
            self.on_done(r)
            return
        self.waiting.append(r)
        self.outstanding += (r.prompt - r.done_prefill) if self.spec.role != "decode" else r.output
        if not self.busy and not self.between_steps:
            if self.spec.call_steps and (self.proc is None or self.proc.owner is None):
                # the engine loop's step takes every request of this instant (the replay submits all
                # that are due before it steps); on a processor another instance holds, queue for it
                self.between_steps = True
                self.sim.at(self.sim.now, self._next_step)
            else:
                self._start()
        elif self.ff is not None:
            self._cut_short()

    def _cut_short(self) -> None:
        """A request arrived during a fast-forwarded decode run: end the run after the step in progress."""
        start, t1, k = self.ff
        done = min(k, int((self.sim.now - start) / t1) + 1)
        if done < k:
            self.version += 1
            self.ff = None
            self.sim.at(start + done * t1, self._decode_done, done, self.version, t1)

    # -- scheduling ---------------------------------------------------------------------------
    def _admit_rows(self) -> None:
        """Decode instance: KV-ready requests join the batch (FCFS) while cache and rows allow."""
        while self.waiting and len(self.rows) < self.spec.max_batch:
            r = self.waiting[0]
            need = self.kv_need(r)
            if not self._make_room(need):
                break
            self.waiting.pop(0)
            r.kv = need
            self.kv_used += need
            self._add_row(r)

    def _add_row(self, r: Request) -> None:
        self.rows.append(r)
        self.ctx = np.append(self.ctx, r.prompt + 1)
        self.rem = np.append(self.rem, r.output - 1)

    def _admit_prefill(self) -> None:
        """Prefill / colocated: queued prompts start (colocated reserves their KV first; a prefill
        instance with a prefix cache holds the prompt's KV until it is sent)."""
        while self.waiting:
            r = self.waiting[0]
            if self.spec.role == "colocated":
                if len(self.rows) + len(self.prefilling) >= self.spec.max_batch:
                    break
                need = self.kv_need(r)
                if not self._make_room(need):
                    break
                r.kv = need
                self.kv_used += need
            elif len(self.prefilling) >= 64:
                break
            elif self.cache is not None:
                need = self.spec.capacity.seq_bytes_per_device(r.prompt)
                if not self._make_room(need) and self.prefilling:
                    break  # (a prompt alone always starts: the prefill cache is no admission limit)
                r.kv_prefill = need
                self.kv_used += need
            self.waiting.pop(0)
            if self.spec.call_steps and self.cache is not None:  # the engine reuses what is indexed now
                r.cached = r.done_prefill = self.cache.take(r)
                self.outstanding -= r.cached
            self.prefilling.append(r)

    def _start(self) -> None:
        if self.busy:
            return
        if self.spec.call_steps:
            self._engine_step()
            return
        role = self.spec.role
        if role == "decode":
            self._admit_rows()
            if self.rows:
                self._decode_iteration()
            return
        self._admit_prefill()
        if self.prefilling:
            self._mixed_iteration()
        elif role == "colocated" and self.rows:
            self._decode_iteration()

    def _decode_iteration(self) -> None:
        """k decode steps at once (until a row finishes or another event may change the batch)."""
        n = len(self.rows)
        cost = self.cost
        mean_ctx = float(self.ctx.mean())
        t1 = cost.decode_step(n, mean_ctx)
        k = max(1, int(self.rem.min()) if n else 1)
        if k > 1:
            t1 = cost.decode_step(n, mean_ctx + (k - 1) / 2.0)
        self.busy = True
        self.ff = (self.sim.now, t1, k)
        self.sim.at(self.sim.now + k * t1, self._decode_done, k, self.version, t1)

    def _decode_done(self, k: int, version: int, t1: float) -> None:
        if version != self.version:
            return  # this run was cut short; its replacement event ends it
        self.busy = False
        self.ff = None
        self.busy_decode += k * t1
        self.ctx += k
        self.rem -= k
        self._retire()
        self._start()

    def _retire(self) -> None:
        if not len(self.rows):
            return
        done = np.nonzero(self.rem <= 0)[0]
        if not len(done):
            return
        now = self.sim.now
        keep = np.ones(len(self.rows), bool)
        keep[done] = False
        for i in done:
            r = self.rows[i]
            r.t_done = now
            self._finish_kv(r, r.kv, r.prompt + r.output)
            if self.spec.role == "decode":
                self.outstanding -= r.output
            self.on_done(r)
        self.rows = [r for r, k_ in zip(self.rows, keep) if k_]
        self.ctx, self.rem = self.ctx[keep], self.rem[keep]

    def _mixed_iteration(self) -> None:
        """One chunked-prefill iteration (colocated: plus one token of every running row)."""
        cost = self.cost
        n_dec = len(self.rows)
        budget = self.spec.chunk - (n_dec if self.spec.role == "colocated" else 0)
        terms = dict(pf_pairs_full=0.0, pf_pairs_capped=0.0, pf_prefix_full=0.0, pf_prefix_capped=0.0)
        taken: list[tuple[Request, int]] = []
        tokens = 0
        for r in self.prefilling:
            if budget <= 0:
                break
            c = min(budget, r.prompt - r.done_prefill)
            for key, v in cost.chunk_terms(r.done_prefill, c).items():
                terms[key] += v
            taken.append((r, c))
            budget -= c
            tokens += c
        finishing = sum(1 for r, c in taken if r.done_prefill + c >= r.prompt)
        if n_dec:
            ctx = self.ctx.astype(np.float64)
            dec_full = float(ctx.sum())
            dec_capped = float(np.minimum(ctx, self.chunk_cap).sum()) if self.chunk_cap else dec_full
        else:
            dec_full = dec_capped = 0.0
        if self.pp > 1 and n_dec:  # rows in pp microbatches; the chunk rides with one of them
            per = cost.stage_time((n_dec / self.pp), n_dec / self.pp, dec_full / self.pp, dec_capped / self.pp)
            t = (self.pp - 1) * per + cost.stage_time(tokens + n_dec / self.pp, finishing + n_dec / self.pp,
                                                      dec_full / self.pp, dec_capped / self.pp, **terms)
            t_dec = self.pp * per  # what the decode rows alone would have taken
            latency_extra = 0.0
        else:
            t = cost.stage_time(tokens + n_dec, finishing + n_dec, dec_full, dec_capped, **terms)
            t_dec = cost.stage_time(n_dec, n_dec, dec_full, dec_capped) if n_dec else 0.0
            latency_extra = (self.pp - 1) * t if self.spec.role == "prefill" else 0.0
            if self.spec.role == "colocated":
                t *= self.pp
                t_dec *= self.pp
        t_dec = min(t_dec, t)
        self.busy_decode += t_dec
        self.busy_prefill += t - t_dec
        self.busy = True
        self.sim.at(self.sim.now + t, self._mixed_done, taken, n_dec, latency_extra)

    def _advance_prefill(self, taken) -> list:
        """Credit each (request, tokens) prefilled this call; the requests whose prompt is now done."""
        finished = []
        for r, c in taken:
            r.done_prefill += c
            if r.done_prefill >= r.prompt:
                finished.append(r)
        if finished:
            self.prefilling = [r for r in self.prefilling if r.done_prefill < r.prompt]
        return finished

    def _mixed_done(self, taken, n_dec: int, latency_extra: float) -> None:
        self.busy = False
        now = self.sim.now
        if n_dec:
            self.ctx[:n_dec] += 1
            self.rem[:n_dec] -= 1
        finished = self._advance_prefill(taken)
        self._retire() if n_dec else None
        for r in finished:
            self.outstanding -= r.prompt - r.cached
            if self.spec.role == "prefill":
                if r.kv_prefill:  # the prompt's KV stays cached here for the session's next turn
                    self._finish_kv(r, r.kv_prefill, r.prompt)
                self.sim.at(now + latency_extra, self._prefilled, r)
            else:  # colocated: first token now, the row decodes from the next iteration
                r.t_first = now
                if r.output <= 1:
                    r.t_done = now
                    self._finish_kv(r, r.kv, r.prompt + r.output)
                    self.on_done(r)
                else:
                    self._add_row(r)
        self._start()

    # -- this engine's loop (InstanceSpec.call_steps > 0) -------------------------------------
    def _engine_step(self) -> None:
        """One step of engine/core.py's loop: a prefill call, then a decode call of the running rows
        (rows whose prompt completed in this step's prefill call join it)."""
        proc = self.proc
        if proc is not None and proc.owner is not None and proc.owner is not self:
            proc.wait(self)
            return
        role, cost, now = self.spec.role, self.cost, self.sim.now
        if role == "decode":
            self._admit_rows()
        else:
            self._admit_prefill()
        t_pf, taken = self._engine_prefill() if self.prefilling else (0.0, [])
        done_pf = [r for r, c in taken if r.done_prefill + c >= r.prompt]
        joining = [r for r in done_pf if r.output > 1] if role == "colocated" else []
        steps, t_dec = 0, 0.0
        n = len(self.rows) + len(joining)
        if role != "prefill" and n:
            # engine/core.py `chunking`: an admitted prompt still incomplete after this call
            left = any(r not in done_pf for r in self.prefilling)
            steps = 1 if left and role == "colocated" else self.spec.call_steps
            ctx = float(self.ctx.sum()) + sum(r.prompt for r in joining)
            b = _pow2(n)
            capped = ctx if not self.chunk_cap else float(np.minimum(
                np.concatenate([self.ctx, [r.prompt for r in joining]]), self.chunk_cap).sum())
            per_step = cost.stage_time(b, b, ctx + n * (steps - 1) / 2.0, capped + n * (steps - 1) / 2.0)
            call = cost.hw.step_overhead_s  # the engine's overhead is per program call, not per token
            t_dec = self.pp * (steps * (per_step - call) + call)
        if self.jitter is not None:  # each call's time drawn around its price (median = the price)
            spread = cost.hw.call_time_spread
            f_pf, f_dec = np.exp(spread * self.jitter.standard_normal(2))
            t_pf, t_dec = t_pf * f_pf, t_dec * f_dec
        t = t_pf + t_dec
        if t <= 0.0:
            return
        self.busy = True
        if proc is not None:
            proc.owner = self
            proc.step_end = now + t
        self.step_end = now + t
        self.busy_prefill += t_pf
        self.busy_decode += t_dec
        self.sim.at(now + t, self._engine_done, taken, joining, len(self.rows), steps, now + t_pf)

    def _engine_prefill(self) -> tuple[float, list[tuple[Request, int]]]:
        """Time and (request, tokens) of the engine's next prefill call: whole prompts (nothing cached,
        batched up to `chunk` tokens, padded to powers of two) or the next chunk of each prompt."""
        cost, spec = self.cost, self.spec
        budget = spec.chunk
        terms = dict(pf_pairs_full=0.0, pf_pairs_capped=0.0, pf_prefix_full=0.0, pf_prefix_capped=0.0)
        head = self.prefilling[0]
        taken: list[tuple[Request, int]] = []
        if head.done_prefill == 0 and head.prompt <= budget:
            used = 0
            for r in self.prefilling:
                if r.done_prefill or len(taken) >= spec.max_batch or (taken and used + r.prompt > budget):
                    break
                longest = max([x.prompt for x, _ in taken] + [r.prompt])
                if taken and _pow2(len(taken) + 1) * _pow2(longest, 16) > spec.max_batch_tokens:
                    break
                taken.append((r, r.prompt))
                used += r.prompt
            b, width = _pow2(len(taken)), _pow2(max(n for _, n in taken), 16)
            for k, v in cost.chunk_terms(0, width).items():
                terms[k] += b * v
            return cost.stage_time(b * width, b, **terms) * self.pp * cost.hw.whole_factor(b * width), taken
        else:
            for r in self.prefilling:
                if budget <= 0 or len(taken) >= spec.max_batch:
                    break
                n = min(r.prompt - r.done_prefill, budget)
                taken.append((r, n))
                budget -= n
            b, width = _pow2(len(taken)), _pow2(max(n for _, n in taken), 16)
            for r, _ in taken:
                for k, v in cost.chunk_terms(r.done_prefill, width).items():
                    terms[k] += v
        return cost.stage_time(b * width, b, **terms) * self.pp, taken

    def _engine_done(self, taken, joining, n_prev: int, steps: int, t_first: float) -> None:
        self.busy = False
        finished = self._advance_prefill(taken)
        if self.cache is not None:  # the engine indexes a prompt's pages as they are written
            for r, _ in taken:
                self.cache.put_system(r.done_prefill if r.turn == 0 else r.prompt)
        shipping = 0.0
        for r in finished:
            self.outstanding -= r.prompt - r.cached
            if self.spec.role == "prefill":
                if r.kv_prefill:  # the prompt's KV stays cached here for the session's next turn
                    self._finish_kv(r, r.kv_prefill, r.prompt)
                shipping = max(shipping, self._prefilled(r))
            else:
                r.t_first = t_first
                if r.output <= 1:
                    r.t_done = t_first
                    self._finish_kv(r, r.kv, r.prompt + r.output)
                    self.on_done(r)
        for r in joining:
            self._add_row(r)
            self.ctx[-1] -= 1  # the first token's KV is written by the decode call
        if steps:
            k = n_prev + len(joining)
            self.ctx[:k] += steps
            self.rem[:k] -= steps
            self._retire()
        # the next step starts after what happens at this instant (the next turns of sessions that
        # just finished arrive now; the engine's replay submits them before its next step). On a
        # shared processor the engine ships a prefill call's pages inside its step, before the decode
        # worker's turn: the shipment holds the processor, and the rows it completes decode next.
        self.between_steps = True
        self.sim.at(self.sim.now + (shipping if self.proc is not None else 0.0), self._next_step)

    def _next_step(self) -> None:
        self.between_steps = False
        proc = self.proc
        if proc is None:
            self._start()
            return
        if proc.owner is self:
            proc.owner = None
        queue, proc.waiting = proc.waiting + [self], []
        for x in queue:  # the others' turn first (the engine loop steps its workers in turn)
            x._start()

    def _prefilled(self, r: Request) -> float:
        """r's prompt is done here: first token now; returns the seconds its KV takes to reach decode."""
        r.t_first = self.sim.now
        return self.on_prefilled(r) or 0.0


@dataclasses.dataclass
class SimResult:
    rate: float  # arrivals per second: requests, or sessions for an AgentWorkload
    n: int
    ttft: dict[str, float]
    tpot: dict[str, float]
    attainment: float  # fraction of requests meeting both SLOs
    rejected: int
    throughput_tok_s: float
    makespan: float
    hit_ratio: float = 0.0  # prompt tokens found cached / prompt tokens
    input_tok_s: float = 0.0  # prompt tokens per second offered (measured requests over their arrival span)
    output_tok_s: float = 0.0
    input_share: float = 0.5  # share of the plan's GPU time that serves prompts (prefill), the rest output
    gpus: int = 0
    transferred_tokens: int = 0  # prompt tokens whose KV crossed P -> D (measured requests)
    prefill_tokens: int = 0  # prompt tokens prefilled (not found cached)
    samples: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)  # ttft, tpot per request (s)

    def usd_per_mtok(self, usd_per_gpu_hour: float) -> tuple[float, float]:
        """(input, output) dollars per million tokens at this rate: the plan's GPU-hours split by
        input_share between the prompt and the generated tokens it serves."""
        usd_s = self.gpus * usd_per_gpu_hour / 3600.0
        inp = usd_s * self.input_share / self.input_tok_s * 1e6 if self.input_tok_s > 0 else math.inf
        out = usd_s * (1.0 - self.input_share) / self.output_tok_s * 1e6 if self.output_tok_s > 0 else math.inf
        return inp, out

    def row(self, usd_per_gpu_hour: float | None = None) -> dict[str, Any]:
        out = dict(rate=round(self.rate, 4), attainment=round(self.attainment, 4), rejected=self.rejected,
                   ttft_p50_ms=self.ttft["p50"] * 1e3, ttft_p90_ms=self.ttft["p90"] * 1e3,
                   ttft_p99_ms=self.ttft["p99"] * 1e3, tpot_p50_ms=self.tpot["p50"] * 1e3,
                   tpot_p90_ms=self.tpot["p90"] * 1e3, tpot_p99_ms=self.tpot["p99"] * 1e3,
                   throughput_tok_s=round(self.throughput_tok_s, 1), hit_ratio=round(self.hit_ratio, 4),
                   input_tok_s=round(self.input_tok_s, 1), output_tok_s=round(self.output_tok_s, 1),
                   input_share=round(self.input_share, 4), prefill_tokens=self.prefill_tokens,
                   transferred_tokens=self.transferred_tokens)
        if usd_per_gpu_hour is not None:
            inp, outp = self.usd_per_mtok(usd_per_gpu_hour)
            tok_s = self.input_tok_s + self.output_tok_s
            blended = self.gpus * usd_per_gpu_hour / 3600.0 / tok_s * 1e6 if tok_s > 0 else math.inf
            out |= dict(usd_per_gpu_hour=usd_per_gpu_hour, usd_per_mtok_input=inp, usd_per_mtok_output=outp,
                        usd_per_mtok_all=blended)
        return out


def _pct(a: np.ndarray) -> dict[str, float]:
    if not len(a):
        return dict(p50=math.inf, p90=math.inf, p99=math.inf)
    return {f"p{q}": float(np.percentile(a, q)) for q in (50, 90, 99)}


def run_length(workload: Workload | AgentWorkload, rate: float, n_min: int = 300, n_max: int = 2000,
               lifetimes: float = 6.0, min_seconds: float = 60.0) -> int:
    """Arrivals to simulate at `rate`: spanning max(`lifetimes` x (TTFT SLO + mean output x
    TPOT SLO), min_seconds), so the batch fills and an overload shows as a growing queue rather than
    hiding in the TTFT slack; clipped to [n_min, n_max]. Sessions: arrivals spanning three session
    lives (AgentWorkload.session_seconds), at most 20,000 turns."""
    if isinstance(workload, AgentWorkload):  # sessions: one life to fill the system, two measured
        return int(max(8, min(20000 // workload.turns, 3 * rate * workload.session_seconds())))
    _, mo = workload.means()
    life = workload.ttft_slo + mo * workload.tpot_slo
    return int(min(n_max, max(n_min, rate * max(lifetimes * life, min_seconds))))


def simulate(
    plan: ClusterPlan,
    workload: Workload | AgentWorkload,
    rate: float,
    n: int | None = None,
    seed: int = 0,
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
    warmup: float = 0.2,
    affinity: bool = True,
    one_loop: bool = False,
    sessions: Sequence[Sequence[Turn]] | None = None,
    starts: Sequence[float] | None = None,
) -> SimResult:
    """Run Poisson arrivals at `rate` per second through the cluster plan: n requests of a Workload,
    or n sessions of an AgentWorkload (default run_length()). Metrics cover the requests after the
    first `warmup` fraction (the empty start).

    Sessions (AgentWorkload): every instance keeps a prefix cache in the KV memory its running
    requests leave (_PrefixCache: conversations of finished turns, LRU). A turn's cached prefix is
    not prefilled (chunked prefill starts after it, attending to it) -- a colocated or prefill
    instance holds what it prefilled (a colocated one the answer too), a decode instance the whole
    conversation, so only the pages it lacks cross from prefill to decode. Routing: with `affinity`
    the front picks the instance with the least uncached work (queued tokens minus this turn's
    cached prefix there; the prefix-overlap + load score of issue 20's router) and P -> D goes to the
    decode instance holding the conversation; without it, the least loaded instance and the decode
    instance with the most free KV, blind to caches (a hit only where a turn lands by chance).

    The engine loop (InstanceSpec.call_steps) with Hardware.call_time_spread > 0 draws every call's
    time around its price (seeded by `seed`): one run is one sample of a jittering machine; pool
    several seeds for its distribution."""
    if ttft_slo is not None or tpot_slo is not None:
        workload = dataclasses.replace(workload, ttft_slo=ttft_slo or workload.ttft_slo,
                                       tpot_slo=tpot_slo or workload.tpot_slo)
    agent = isinstance(workload, AgentWorkload)
    replayed = sessions is not None
    if replayed:
        if not agent or starts is None or len(starts) != len(sessions):
            raise ValueError("a replayed trace needs an AgentWorkload and one start time per session")
        n, arrivals = len(sessions), np.asarray(starts, np.float64)
        sessions = [list(x) for x in sessions]
    else:
        n = n or run_length(workload, rate)
        rng = np.random.default_rng(seed + 1)
        arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    sim = _Sim()
    reqs: list[Request] = []
    done: list[Request] = []
    pre: list[_Instance] = []
    dec: list[_Instance] = []
    col: list[_Instance] = []
    system = workload.system_tokens if agent else None
    if agent and not replayed:
        sessions = workload.sessions(n, seed)

    def finished(r: Request) -> None:
        done.append(r)
        if agent and r.turn + 1 < len(sessions[r.session]):
            nxt = sessions[r.session][r.turn + 1]
            t = (r.t_done if math.isfinite(r.t_done) else sim.now) + sessions[r.session][r.turn].gap
            sim.at(t, arrive_turn, r.session, r.turn + 1, nxt)

    xfer = None
    if plan.disaggregated:
        p_spec = next(i for i in plan.instances if i.role == "prefill")
        d_spec = next(i for i in plan.instances if i.role == "decode")
        hw = p_spec.cost.hw
        same_node = p_spec.devices + d_spec.devices <= hw.devices_per_node
        link = hw.link_bw if same_node else hw.network_bw
        streams = min(p_spec.devices, d_spec.devices)
        per_token = d_spec.capacity.kv_bytes_per_token_total
        latency = hw.collective_latency_s * 10 if hw.transfer_latency_s is None else hw.transfer_latency_s
        xfer = (per_token, streams * link * hw.bw_efficiency, latency)

        def prefilled(r: Request) -> float:
            """Send r's KV to a decode instance; returns the seconds the transfer takes."""
            if r.output <= 1:
                r.t_done = sim.now
                finished(r)
                return 0.0
            room = {d: d.free_kv() - sum(d.kv_need(w) for w in d.waiting) for d in dec}
            holders = [d for d in dec if d.cache is not None and r.session in d.cache.entries
                       and room[d] >= d.kv_need(r)]  # the conversation's instance, if it can take r now
            target = holders[0] if affinity and holders else max(dec, key=room.__getitem__)
            held = target.cache.take(r) if target.cache is not None else 0
            r.xfer_tokens = r.prompt - held  # only the pages the decode instance lacks cross
            t = r.xfer_tokens * xfer[0] / xfer[1] + xfer[2]
            sim.at(sim.now + t, target.submit, r)
            return t

        for spec in plan.instances:
            for _ in range(spec.count):
                if spec.role == "prefill":
                    pre.append(_Instance(sim, spec, prefilled, finished, system))
                else:
                    dec.append(_Instance(sim, spec, None, finished, system))
        front = pre
    else:
        for spec in plan.instances:
            for _ in range(spec.count):
                col.append(_Instance(sim, spec, None, finished, system))
        front = col
    if one_loop:
        proc = _Processor()
        for x in pre + dec + col:
            x.proc = proc
    jitter = np.random.default_rng(seed + 2)
    for x in pre + dec + col:
        if x.spec.call_steps and x.cost.hw.call_time_spread > 0:
            x.jitter = jitter

    def load(x: _Instance) -> float:
        return x.outstanding + (len(x.rows) * 8 if x.spec.role == "colocated" else 0)

    def arrive(r: Request) -> None:
        if affinity and agent:
            target = min(front, key=lambda x: load(x) - x.cache.hit(r))
        else:
            target = min(front, key=load)
        if target.cache is not None and not target.spec.call_steps:
            r.cached = r.done_prefill = target.cache.take(r)
        target.submit(r)  # (the engine loop looks its cache up when it admits the request)

    def arrive_turn(session: int, turn: int, t: Turn) -> None:
        r = Request(len(reqs), sim.now, t.prompt, t.output, session, turn)
        reqs.append(r)
        arrive(r)

    if agent:
        for i in range(n):
            if sessions[i]:
                sim.at(float(arrivals[i]), arrive_turn, i, 0, sessions[i][0])
    else:
        prompts, outputs = workload.sample(n, seed)
        reqs.extend(Request(i, float(arrivals[i]), prompts[i], outputs[i]) for i in range(n))
        for r in reqs:
            sim.at(r.arrival, arrive, r)
    sim.run()
    ttft_slo, tpot_slo = workload.ttft_slo, workload.tpot_slo
    reqs = sorted(reqs, key=lambda r: r.arrival)
    if replayed:
        measured = reqs
        span = max((r.t_done for r in reqs if r.t_done is not None and math.isfinite(r.t_done)), default=0.0)
    elif agent:  # after one session life (the system filling) until sessions stop starting (the drain runs light)
        hi_t = float(arrivals[-1])
        lo_t = min(max(float(arrivals[int(warmup * n)]), workload.session_seconds()), hi_t * 0.5)
        measured = [r for r in reqs if lo_t <= r.arrival <= hi_t]
        span = hi_t - lo_t
    else:
        measured = reqs[int(warmup * len(reqs)):]
        span = (measured[-1].arrival - measured[0].arrival) if len(measured) > 1 else 0.0
    ok = [r for r in measured if not r.rejected and r.t_done is not None]
    ttft = np.array([r.t_first - r.arrival for r in ok])
    tpot = np.array([(r.t_done - r.t_first) / (r.output - 1) for r in ok if r.output > 1])
    good = sum(1 for r in ok if r.t_first - r.arrival <= ttft_slo and
               (r.output <= 1 or (r.t_done - r.t_first) / (r.output - 1) <= tpot_slo))
    end = max((r.t_done for r in ok), default=0.0)
    toks = sum(r.output for r in ok)
    prompt_toks = sum(r.prompt for r in ok)
    instances = pre + dec + col
    if plan.disaggregated:
        p_gpus = sum(x.spec.devices for x in pre)
        share = p_gpus / max(1, p_gpus + sum(x.spec.devices for x in dec))
    else:
        busy_p = sum(x.busy_prefill for x in instances)
        busy_d = sum(x.busy_decode for x in instances)
        share = busy_p / (busy_p + busy_d) if busy_p + busy_d > 0 else 0.5
    return SimResult(
        rate=rate, n=len(measured), ttft=_pct(ttft), tpot=_pct(tpot), attainment=good / max(1, len(measured)),
        rejected=sum(r.rejected for r in measured), throughput_tok_s=toks / max(end, 1e-9), makespan=end,
        hit_ratio=sum(r.cached for r in ok) / prompt_toks if prompt_toks else 0.0,
        input_tok_s=prompt_toks / span if span > 0 else 0.0, output_tok_s=toks / span if span > 0 else 0.0,
        input_share=share, gpus=plan.gpus, transferred_tokens=int(sum(r.xfer_tokens for r in ok)),
        prefill_tokens=int(sum(r.prompt - r.cached for r in ok)), samples=dict(ttft=ttft, tpot=tpot),
    )


# ------------------------------------------------------------------------------------------------
# Goodput and plan search
# ------------------------------------------------------------------------------------------------


def throughput_bound(plan: ClusterPlan, workload: Workload | AgentWorkload) -> float:
    """An optimistic arrivals/s bound: min(prefill capacity, decode capacity) of the plan, the decode
    batch limited by the KV cache, max_batch and the TPOT SLO. For sessions: every turn's prefix
    cached (only its new tokens prefilled), in sessions/s."""
    mp, mo = workload.means()
    new = workload.new_tokens_mean() if isinstance(workload, AgentWorkload) else mp
    pre = dec = 0.0
    for spec in plan.instances:
        cost = spec.cost
        if spec.role in ("prefill", "colocated"):
            pre_rate = spec.chunk / (cost.stage_time(spec.chunk, 1, **cost.chunk_terms(int(mp / 2), spec.chunk)))
            pre += spec.count * pre_rate / new
        if spec.role in ("decode", "colocated"):
            ctx = mp + mo / 2
            per_req = spec.capacity.seq_bytes_per_device(mp + mo)
            b = int(min(spec.max_batch, spec.capacity.kv_free_per_device / max(per_req, 1.0)))
            while b > 1 and cost.decode_step(b, ctx) > workload.tpot_slo:
                b = int(b * 0.8)
            if b < 1:
                continue
            dec += spec.count * b / cost.decode_step(b, ctx) / mo
    per_arrival = workload.mean_turns() if isinstance(workload, AgentWorkload) else 1
    return min(pre, dec) / per_arrival


def goodput(
    plan: ClusterPlan,
    workload: Workload | AgentWorkload,
    n: int | None = None,
    seed: int = 0,
    target: float = 0.9,
    iters: int = 7,
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
    bound: float | None = None,
    affinity: bool = True,
) -> tuple[float, SimResult | None]:
    """Highest rate (arrivals/s) with >= target of requests meeting both SLOs (bisection)."""
    hi = (bound if bound is not None else throughput_bound(plan, workload)) * 1.3
    if hi <= 0:
        return 0.0, None
    lo, best = 0.0, None
    kw = dict(n=n, seed=seed, ttft_slo=ttft_slo, tpot_slo=tpot_slo, affinity=affinity)
    for _ in range(4):  # the bound is a model too: raise it while the plan still meets the SLOs
        r = simulate(plan, workload, hi, **kw)
        if r.attainment < target:
            break
        lo, best, hi = hi, r, hi * 2
    else:
        return lo, best
    for _ in range(iters):
        mid = (lo + hi) / 2
        r = simulate(plan, workload, mid, **kw)
        if r.attainment >= target:
            lo, best = mid, r
        else:
            hi = mid
    if best is None:
        r = simulate(plan, workload, lo if lo > 0 else hi / 2 ** iters, **kw)
        if r.attainment >= target:
            return r.rate, r
        return 0.0, r
    return lo, best


def _instance_meshes(size: int, hw: Hardware) -> list[str]:
    """Meshes of one instance: tp inside a node, pp across (and pp=2 inside a node)."""
    node = hw.devices_per_node
    out = []
    if size <= node:
        out.append(f"tp={size}" if size > 1 else "tp=1")
        if size >= 4:
            out.append(f"pp=2,tp={size // 2}")
    elif size % node == 0:
        out.append(f"pp={size // node},tp={node}")
    return out


@dataclasses.dataclass
class _Choice:
    mesh: str
    role: str
    cap: CapacityPlan
    cost: CostModel


def _choices(model, hw: Hardware, weights: str, count: int, kv_dtype: str, max_batch: int,
             meshes: Sequence[str] | None = None) -> dict[str, list[_Choice]]:
    name, hf = load_hf_config(model)
    out: dict[str, list[_Choice]] = {"prefill": [], "decode": [], "colocated": []}
    size = 1
    while size <= count:
        for mesh in _instance_meshes(size, hw):
            if meshes is not None and mesh not in meshes:
                continue
            for role in out:
                try:
                    cap = plan_capacity(hf | {"_name": name}, Deployment(hw, size, mesh=mesh, weights=weights, kv_dtype=kv_dtype,
                                                                         role=role, max_decode_batch=max_batch))
                except PlanError:
                    continue
                if cap.fits:
                    out[role].append(_Choice(mesh, role, cap, CostModel(cap, hw)))
        size *= 2
    # keep the two smallest fitting instance sizes per role (larger ones rarely pay per GPU)
    for role, lst in out.items():
        sizes = sorted({c.cost.devices for c in lst})[:2]
        out[role] = [c for c in lst if c.cost.devices in sizes]
    return out


def candidate_plans(
    model, hardware: str | Hardware, count: int, weights: str = "bf16", kv_dtype: str = "bf16",
    max_batch: int = 256, chunks: Sequence[int] = (512, 2048, 8192), prefill_chunk: int = 8192,
    meshes: Sequence[str] | None = None,
) -> tuple[list[ClusterPlan], list[ClusterPlan]]:
    """(disaggregated, colocated) cluster plans that use at most `count` devices (instance meshes:
    tp inside a node, pp across nodes and pp=2 inside one; `meshes` restricts them)."""
    hw = get_hardware(hardware)
    if count < 1:
        raise PlanError(f"device count must be >= 1, got {count}")
    ch = _choices(model, hw, weights, count, kv_dtype, max_batch, meshes)
    if not ch["colocated"]:
        raise PlanError(f"the model fits on no instance of up to {count} {hw.name} devices")
    dis, col = [], []
    for p in ch["prefill"]:
        for d in ch["decode"]:
            for n_p in range(1, count // p.cost.devices + 1):
                left = count - n_p * p.cost.devices
                n_d = left // d.cost.devices
                if n_d < 1:
                    continue
                # every split of the devices: n_p prefill instances, the rest decode
                dis.append(ClusterPlan([
                    InstanceSpec("prefill", p.mesh, n_p, prefill_chunk, max_batch, p.cost, p.cap),
                    InstanceSpec("decode", d.mesh, n_d, 0, max_batch, d.cost, d.cap),
                ]))
    for c in ch["colocated"]:
        n_c = count // c.cost.devices
        for chunk in chunks:
            col.append(ClusterPlan([InstanceSpec("colocated", c.mesh, n_c, chunk, max_batch, c.cost, c.cap)]))
    return dis, col


def search(
    model, hardware: str | Hardware, count: int, workload: Workload | AgentWorkload, weights: str = "bf16",
    kv_dtype: str = "bf16", n: int | None = None, seed: int = 0, ttft_slo: float | None = None,
    tpot_slo: float | None = None, max_batch: int = 256, log: Callable[[str], None] | None = None, prune: bool = True,
    meshes: Sequence[str] | None = None, iters: int = 7, affinity: bool = True, usd_per_gpu_hour: float | None = None,
) -> dict[str, Any]:
    """Best disaggregated and best colocated plan by goodput per GPU (plans whose optimistic bound
    cannot beat the best found so far are skipped). With usd_per_gpu_hour the rows carry the cost
    per million input / output tokens at each plan's goodput; `affinity` is simulate's routing."""
    if tpot_slo is not None or ttft_slo is not None:
        workload = dataclasses.replace(workload, ttft_slo=ttft_slo or workload.ttft_slo, tpot_slo=tpot_slo or workload.tpot_slo)
    dis, col = candidate_plans(model, hardware, count, weights, kv_dtype, max_batch, meshes=meshes)
    out: dict[str, Any] = {"workload": dataclasses.asdict(workload) | {"kind": type(workload).__name__}}
    evaluated = []
    for kind, plans in (("disaggregated", dis), ("colocated", col)):
        best = None
        scored = sorted(((throughput_bound(p, workload), p) for p in plans), key=lambda x: -x[0] / x[1].gpus)
        for bound, p in scored:
            if prune and best is not None and bound * 1.5 / p.gpus <= best["goodput_per_gpu"]:
                continue
            g, res = goodput(p, workload, n=n, seed=seed, bound=bound, iters=iters, affinity=affinity)
            row = dict(plan=p.describe(), goodput=g, goodput_per_gpu=g / p.gpus, bound=bound)
            if res is not None:
                row |= res.row(usd_per_gpu_hour)
            evaluated.append(row | {"kind": kind, "cluster": p})
            if log:
                log(f"{kind:14s} {p.describe()['label']:60s} goodput {g:7.3f}/s ({g / p.gpus:.4f}/GPU)")
            if best is None or row["goodput_per_gpu"] > best["goodput_per_gpu"]:
                best = row | {"cluster": p}
        out[f"best_{kind}"] = best
    out["evaluated"] = evaluated
    out["candidates"] = dict(disaggregated=len(dis), colocated=len(col))
    return out


def routed(plan: ClusterPlan) -> bool:
    """Whether routing has a choice to make in this plan (more than one instance of a routed role)."""
    return any(i.count > 1 for i in plan.instances)


def affinity_effect(plan: ClusterPlan, workload: AgentWorkload, usd_per_gpu_hour: float, n: int | None = None,
                    seed: int = 0, iters: int = 7) -> dict[str, Any]:
    """The plan with and without session affinity: at each policy's goodput (hit ratio, latencies,
    cost per token) and at one shared rate (the lower goodput: the same offered load)."""
    out: dict[str, Any] = {"plan": plan.describe()["label"]}
    rates = {}
    for name, aff in (("with_affinity", True), ("without_affinity", False)):
        g, res = goodput(plan, workload, n=n, seed=seed, iters=iters, affinity=aff)
        rates[name] = g
        out[name] = dict(goodput=g) | (res.row(usd_per_gpu_hour) if res is not None else {})
    shared = min(rates.values())
    if shared > 0:
        out["same_rate"] = {name: simulate(plan, workload, shared, n=n, seed=seed, affinity=aff).row(usd_per_gpu_hour)
                            for name, aff in (("with_affinity", True), ("without_affinity", False))}
    return out
