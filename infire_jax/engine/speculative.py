"""Speculative decoding: proposers, adaptive draft lengths, and when speculation pays.

A decoding worker (engine/core.py) with a `Speculator` asks it, before each decode call, for draft
tokens per running row. With drafts, the call is one verification step (Programs.verify_fn: the
row's last token and its k drafts scored in one pass over the paged KV, the longest agreeing prefix
kept, the rest rolled back by length); without, it is the ordinary multi-step decode call. So
speculation can only replace a decode call where it is predicted to produce more tokens per second:

  tokens per verify call  sum over rows of 1 + a_r, a_r = expected accepted drafts of row r
                          (alpha_r + alpha_r^2 + ... + alpha_r^k_r from its recent acceptance rate)
  tokens per decode step  the batch's rows
  cost                    the measured wall time of each kind of call for this batch size (verify:
                          per chunk width, timed from before drafting, so a model proposer's drafts
                          are part of it; a call that compiled anything is no measurement), an EMA;
                          before a measurement, a prior that charges a verify of b rows x c columns
                          1 + b c / 16 decode steps (SmolLM2-135M on CPU: 1 x 5 and 1 x 9 cost
                          1.1-1.4 and 1.4-2 decode steps, 16 x 2, 16 x 5 and 16 x 9 cost 3, 5.5 and
                          9). An unmeasured width is priced as the nearest wider one measured for
                          its batch; else batches of at most 4 rows try it once, larger ones go by
                          the prior.

A worker whose mesh spans processes (SPMD) decides on the prior alone: every process must take the
same decision, and clocks differ between processes. A worker on a mesh of its own process (a decode
worker of a multi-process P/D run) measures, as a lone process does. Each row's draft length adapts
to its acceptance rate: about the run length alpha / (1 - alpha) it sustains, plus one, at most the
configured k (and one more than its last draft count when that was kept whole).

Proposers (the `Proposer` protocol: drafts for a batch of rows, their support, forget a row, warm
up): "ngram" (prompt lookup): the earlier occurrence of the row's last token in its prompt and
output whose preceding tokens agree longest with the row's own (at least 2 in all) proposes the
tokens that followed it; no extra weights. "draft" (engine/draft.py): a second, smaller checkpoint
with the same vocabulary, greedy, with its own paged KV on the decoding worker's devices. "eagle3"
(engine/eagle3.py, a `HiddenStateProposer`): an EAGLE-3 head fed the target's hidden states, which
the worker's decode and verify calls then return.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Protocol, Sequence

import numpy as np

from infire_jax import distributed

__all__ = [
    "SpecConfig", "SpecError", "parse_speculative", "DraftRow", "Proposer", "HiddenStateProposer", "NgramProposer",
    "Speculator", "SpecCounters",
]

METHODS = ("ngram", "draft", "eagle3")


class SpecError(ValueError):
    """A speculative-decoding spec that cannot be used."""


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """method: "ngram" | "draft" | "eagle3"; k: most draft tokens per row per step; path: the draft
    checkpoint (draft, eagle3)."""

    method: str
    k: int
    path: str | None = None

    def __str__(self) -> str:
        return ":".join([self.method] + ([self.path] if self.path else []) + [str(self.k)])


def parse_speculative(spec: str | SpecConfig | None) -> SpecConfig | None:
    """'ngram:K' | 'draft:DIR:K' | 'eagle3:DIR:K' (K: 1..16) -> SpecConfig; None or '' -> None."""
    if spec is None or isinstance(spec, SpecConfig):
        return spec or None
    if not isinstance(spec, str):
        raise SpecError(f"speculative must be a string like 'ngram:4', got {type(spec).__name__}")
    if not spec:
        return None
    usage = "use 'ngram:K', 'draft:DIR:K' or 'eagle3:DIR:K' with K draft tokens per step (1..16)"
    method, _, rest = spec.partition(":")
    path, _, k = rest.rpartition(":")
    if method not in METHODS or not k.isdigit() or not 1 <= int(k) <= 16 or (method == "ngram") != (path == ""):
        raise SpecError(f"bad speculative spec {spec!r}: {usage}")
    wanted = {"draft": ("speculative draft model", "a checkpoint sharing the target's tokenizer"),
              "eagle3": ("EAGLE-3 head", "an EAGLE-3 head trained for the target (config.json, safetensors, d2t/t2d)")}
    if method in wanted and not (pathlib.Path(path) / "config.json").is_file():
        what, fix = wanted[method]
        raise SpecError(f"{what} {path!r} is not a checkpoint directory (no config.json there); give "
                        f"'{method}:DIR:K' with DIR {fix}")
    return SpecConfig(method, int(k), path or None)


@dataclasses.dataclass(frozen=True)
class DraftRow:
    """One row asking for drafts: seq = its prompt and output so far (the last token is the one the
    next call feeds), k = most drafts wanted (>= 1), positions = most KV positions the row can ever
    reach (its prompt, every token it may generate, and k)."""

    id: Any
    seq: np.ndarray
    k: int
    positions: int


class Proposer(Protocol):
    """Where drafts come from. A proposer with per-row state (a draft model's KV) keeps what it has
    computed per row and reuses the longest prefix of it that the row's sequence still starts with:
    verification's rollback (and tokens decoded without drafts) need no separate notice.

    costly: drafting runs a model (not free like a lookup): the Speculator then decides verify or
    decode from the draft lengths it would ask for, before drafting, so a declined verification
    costs no drafts. A free proposer is asked for the most drafts every call, and the Speculator
    cuts them to each row's draft length once it knows their `support`."""

    costly: bool

    def draft(self, rows: Sequence[DraftRow]) -> list[np.ndarray]:
        """Up to rows[i].k draft tokens for each row (empty: no drafts for it this step)."""
        ...

    def support(self, rid: Any) -> int:
        """How strongly the row's drafts of the last draft() call are backed, for the acceptance
        prior (Speculator.SUPPORT classes): for prompt lookup, how many tokens its source agrees
        with the row; 0: nothing known beyond the row's own acceptance."""
        ...

    def forget(self, rid: Any) -> None:
        """The row is done (finished, failed or cancelled): drop what is held for it."""
        ...

    def warm(self, shapes: Sequence[tuple[int, int]], k: int) -> None:
        """Compile the programs drafting will run for these (padded batch, pages per row) decode shapes
        and up to k drafts (warm-up, before the first request), writing nothing."""
        ...


class HiddenStateProposer(Proposer, Protocol):
    """A proposer that drafts from the target's hidden states (EAGLE-3, engine/eagle3.py): the decoding
    worker's decode and verify calls capture the inputs of target layers `captures` and hand each
    row's kept positions to `observe`."""

    captures: tuple[int, ...]

    def observe(self, rid: Any, start: int, hidden: np.ndarray) -> None:
        """The target's captured states (n, len(captures) x hidden) of positions start .. start + n - 1."""
        ...


class NgramProposer:
    """Prompt lookup: among the earlier occurrences of the sequence's last token, the one whose
    preceding tokens agree with the sequence's own for the longest stretch (at least min_ngram tokens
    in all, at most max_ngram compared; ties: the most recent) proposes the tokens that followed it.
    The longest agreement picks the right copy source in code, where short n-grams ("self.", "    ")
    recur everywhere, and a copy that is under way keeps following its source: the tokens just
    accepted extend the agreement with it."""

    costly = False

    def __init__(self, max_ngram: int = 32, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"NgramProposer needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.agreement: dict[Any, int] = {}  # per row of the last draft() call: its source's agreement length

    def match(self, seq: np.ndarray) -> tuple[int, int]:
        """(where the continuation starts, agreement length) of the best earlier occurrence of seq's
        ending; (0, 0) if none agrees for min_ngram tokens."""
        L = len(seq)
        ends = np.flatnonzero(seq[: L - 1] == seq[L - 1]) if L > 1 else seq[:0]
        agree = np.ones(len(ends), np.int64)
        alive = ends
        for j in range(1, min(self.max_ngram, L - 1)):  # extend every candidate backwards while it agrees
            alive = alive[alive >= j]
            alive = alive[seq[alive - j] == seq[L - 1 - j]]
            if not alive.size:
                break
            agree[np.searchsorted(ends, alive)] += 1
        if not ends.size or agree.max() < self.min_ngram:
            return 0, 0
        best = agree.max()
        return int(ends[np.flatnonzero(agree == best)[-1]]) + 1, int(best)

    def propose(self, seq: np.ndarray, k: int) -> np.ndarray:
        """Up to k draft tokens following `seq` (1-d int array); empty if no n-gram recurs."""
        at, n = self.match(seq)
        return seq[at: at + k] if n else seq[:0]

    def draft(self, rows: Sequence[DraftRow]) -> list[np.ndarray]:
        out = []
        self.agreement = {}
        for r in rows:
            at, n = self.match(r.seq)
            out.append(r.seq[at: at + r.k] if n else r.seq[:0])
            self.agreement[r.id] = n
        return out

    def support(self, rid: Any) -> int:
        return self.agreement.get(rid, 0)

    def forget(self, rid: Any) -> None:
        """Nothing is held per row (agreement: the last call's rows only)."""

    def warm(self, shapes: Sequence[tuple[int, int]], k: int) -> None:
        """A lookup compiles nothing."""


@dataclasses.dataclass
class SpecCounters:
    """What speculation did (engine.stats() sums these over workers)."""

    proposed_tokens: int = 0
    accepted_tokens: int = 0
    verify_calls: int = 0
    verified_rows: int = 0  # rows with at least one draft, summed over verify calls
    decode_calls: int = 0  # decode calls taken while speculation was on


@dataclasses.dataclass
class _RowState:
    alpha: float  # recent acceptance rate (EMA of accepted / proposed)
    k: int
    support: int = 0  # Proposer.support of its last drafts (n-gram: how long their source agreed; 0: unknown)
    idle: int = 1 << 30  # decode calls since its last verification that kept a draft


class Speculator:
    """Per decoding worker: drafts per row, adaptive k, and the verify-or-decode decision (module doc)."""

    EMA = 0.3
    ACTIVE = 0.4  # a row whose acceptance rate is at least this is speculating: decode calls stay short
    SHORT_STEPS = 2
    IDLE_CALLS = 4  # short decode calls after a row's last accepted draft before its calls are full again
    EXPLORE_ROWS = 4  # batches up to this many rows try an unmeasured verify shape (and take short decode calls)
    PROBE_EVERY = (8, 64)  # decode calls between re-measuring a refused verify (doubling up to the max)
    SUPPORT = (2, 4, 8, 16)  # Proposer.support classes: <= 2, 3-4, 5-8, 9-16, longer
    SUPPORT_PRIOR = (0.2, 0.4, 0.5, 0.7, 0.85)  # acceptance per class, measured for n-gram agreement on SmolLM2

    def __init__(self, config: SpecConfig, windows: Sequence[int | None] = (), proposer: Proposer | None = None,
                 clocked: bool | None = None):
        """clocked: decide on measured call times (the worker's mesh lies in one process, so its
        decisions need not agree with another's); default: when this is the only process."""
        if proposer is None and config.method != "ngram":
            raise SpecError(f"speculative method {config.method!r} needs its proposer (engine/build.py makes it)")
        self.config = config
        self.proposer: Proposer = proposer or NgramProposer()
        # the method says whether its proposer reads the target's hidden states
        self.hidden: HiddenStateProposer | None = proposer if config.method == "eagle3" else None  # type: ignore[assignment]
        self.windows = [w for w in windows if w is not None]
        self.rows: dict[Any, _RowState] = {}
        self.alpha0 = 0.5  # prior for a new row: the worker's recent acceptance
        # acceptance rate per support class (SUPPORT: n-gram agreement lengths), learned from every
        # judged draft that had support, the prior measured on SmolLM2-135M (code and chat answers)
        self.by_support = list(self.SUPPORT_PRIOR)
        self.step_seconds: dict[int, float] = {}  # batch -> seconds per decode step
        self.verify_seconds: dict[tuple[int, int], float] = {}  # (batch, chunk width) -> seconds per call
        self.clocked = distributed.process_count() == 1 if clocked is None else clocked
        self.counters = SpecCounters()
        self.adaptive = True  # False: verify whenever a row has drafts (tests and measurements of the verify path)
        self._refused = 0
        self._granted = False  # drafts() already decided to verify (a costly proposer's drafts)
        self._probe = self.PROBE_EVERY[0]

    # -- drafts -------------------------------------------------------------------------------
    def _state(self, rid: Any) -> _RowState:
        if rid not in self.rows:
            self.rows[rid] = _RowState(self.alpha0, self.config.k)
        return self.rows[rid]

    def _cap(self, length: int, left: int) -> int:
        """Most drafts a row at `length` (its next token's position) may take: its remaining budget and,
        per windowed cache group, the window of the first draft (a draft past it would overwrite ring
        slots its rejected siblings' successors still read)."""
        cap = max(0, left - 1)
        for w in self.windows:
            cap = min(cap, w - (length + 1) % w)
        return cap

    def drafts(self, rows: Sequence[tuple[Any, np.ndarray, int, int]], batch: int | None = None) -> dict[Any, np.ndarray]:
        """Drafts for the rows (id, seq = prompt and output so far, length = KV positions it holds,
        left = tokens it may still generate) in one proposer call; rows without drafts left out. With
        a costly proposer and the call's padded `batch`, none unless a verification would be worth it."""
        self._granted = False
        asked = []
        free = not self.proposer.costly  # ask for the most, cut once the drafts' support is known
        for rid, seq, length, left in rows:
            k = min(self.config.k if free else self._state(rid).k, self._cap(length, left))
            if k > 0:
                asked.append(DraftRow(rid, seq, k, len(seq) + left + self.config.k))
        if asked and self.proposer.costly and batch is not None:
            planned = {row.id: np.zeros(row.k, np.int32) for row in asked}
            if not self.worth(batch, self.width(planned), planned, len(rows)):
                return {}
            self._granted = True
        out = self.proposer.draft(asked) if asked else []
        for i, row in enumerate(asked):
            st = self._state(row.id)
            st.support = self.proposer.support(row.id)
            if free:
                out[i] = out[i][: max(st.k, self._run_k(self._alpha(row.id)))]
        return {row.id: d[: row.k] for row, d in zip(asked, out) if len(d)}

    @staticmethod
    def width(drafts: dict[Any, np.ndarray]) -> int:
        """Columns of the verify call for these drafts: each row's last token and its drafts, the most
        drafts rounded up to a power of two (k = 1, 2, 3-4, 5-8 ... -> 2, 3, 5, 9 columns): few
        programs, and little padding (a column of a row costs about 1/16 of a decode step on CPU)."""
        most = max(len(d) for d in drafts.values())
        return 1 + (1 << max(0, most - 1).bit_length())

    def widths(self) -> list[int]:
        """Every verify width `width` can give for this config's k."""
        return [1 + (1 << i) for i in range(max(0, self.config.k - 1).bit_length() + 1)]

    def decode_steps(self, rids: Sequence[Any], steps: int) -> int:
        """Steps of a decode call taken instead of a verification (no drafts, or not worth it): short
        (SHORT_STEPS) while some row was accepting drafts within its last IDLE_CALLS calls (a copying
        row that strayed from its source is back to verifying within a step or two), else the full
        `steps` (a row that never or no longer gets drafts accepted decodes at full speed)."""
        states = [self._state(rid) for rid in rids]
        short = len(states) <= self.EXPLORE_ROWS and any(st.idle < self.IDLE_CALLS and st.alpha >= self.ACTIVE for st in states)
        for st in states:
            st.idle += 1
        return min(steps, self.SHORT_STEPS) if short else steps

    def forget(self, rid: Any) -> None:
        self.rows.pop(rid, None)
        self.proposer.forget(rid)

    # -- the decision ---------------------------------------------------------------------------
    def _run_k(self, alpha: float) -> int:
        """Draft length for an acceptance rate: the run it sustains (alpha / (1 - alpha)) plus one."""
        return max(1, min(self.config.k, math.ceil(alpha / max(1e-6, 1 - alpha)) + 1))

    def _support_class(self, n: int) -> int:
        return int(np.searchsorted(self.SUPPORT, n))

    def _alpha(self, rid: Any) -> float:
        """The acceptance rate a row's drafts are judged by: its own, or for drafts with support (n-gram
        drafts whose source agrees with the row for long) what such drafts have achieved, if more (a
        copy that resumes, or a new row that copies, verifies at once rather than after decode calls
        have re-scored it)."""
        st = self._state(rid)
        return max(st.alpha, self.by_support[self._support_class(st.support)]) if st.support else st.alpha

    def _expected(self, rid: Any, k: int) -> float:
        a = self._alpha(rid)
        return sum(a ** i for i in range(1, k + 1))

    def _prior_verify(self, b: int, c: int, step: float) -> float:
        return step * (1 + b * c / 16)

    def worth(self, b: int, c: int, drafts: dict[Any, np.ndarray], rows: int) -> bool:
        """Whether a verify call of b padded rows x c columns with these drafts beats a decode call."""
        if not self.adaptive or self._granted:
            self._granted = False
            return True
        step = self.step_seconds.get(b, 1.0) if self.clocked else 1.0
        if self.clocked and b not in self.step_seconds:
            return False  # measure a decode call first
        verify = self.verify_seconds.get((b, c)) if self.clocked else None
        wider = sorted((w, t) for (bb, w), t in self.verify_seconds.items() if bb == b and w > c) if self.clocked else []
        if verify is None and wider:  # a narrower verify costs no more than the nearest wider one measured
            verify = wider[0][1]
        if verify is None:
            if self.clocked and b <= self.EXPLORE_ROWS:  # unmeasured: try it once
                return True
            verify = self._prior_verify(b, c, step)
        gain = (rows + sum(self._expected(rid, len(d)) for rid, d in drafts.items())) / verify
        if gain >= rows / step:
            self._refused, self._probe = 0, self.PROBE_EVERY[0]
            return True
        self._refused += 1
        measured = (b, c) in self.verify_seconds or b <= self.EXPLORE_ROWS  # (a large batch goes by the prior)
        if self.clocked and measured and self._refused >= self._probe:  # re-measure: acceptance and cost drift
            self._refused, self._probe = 0, min(2 * self._probe, self.PROBE_EVERY[1])
            return True
        return False

    def _ema(self, table: dict, key: Any, value: float) -> None:
        table[key] = value if key not in table else (1 - self.EMA) * table[key] + self.EMA * value

    def observed_decode(self, b: int, steps: int, seconds: float | None) -> None:
        """A decode call's wall time (None: it compiled, not a measurement)."""
        self.counters.decode_calls += 1
        if seconds is not None and self.clocked:
            self._ema(self.step_seconds, b, seconds / steps)

    def observed_verify(self, b: int, c: int, seconds: float | None, judged: dict[Any, tuple[int, int]]) -> None:
        """A verify call: its wall time (None: it compiled) and per row (drafts, accepted)."""
        self.counters.verify_calls += 1
        if seconds is not None and self.clocked:
            self._ema(self.verify_seconds, (b, c), seconds)
        for rid, (k, a) in judged.items():
            if not k:
                continue
            self.counters.proposed_tokens += k
            self.counters.accepted_tokens += a
            self.counters.verified_rows += 1
            self._learn(rid, k, a)

    def observed_declined(self, judged: dict[Any, tuple[int, int]]) -> None:
        """Drafts that were proposed but not verified (the decode call was judged cheaper), scored
        against the tokens that decode call produced: per row (drafts compared, how many lead-matched).
        Without this a row refused once would keep its old acceptance estimate, and the off-switch
        could not notice that a row started copying."""
        for rid, (k, a) in judged.items():
            if k:
                self._learn(rid, k, a)

    def _learn(self, rid: Any, k: int, a: int) -> None:
        """Update a row's acceptance estimate and draft length from k drafts of which a were kept."""
        st = self._state(rid)
        if st.support:
            c = self._support_class(st.support)
            self.by_support[c] = (1 - self.EMA) * self.by_support[c] + self.EMA * (a / k)
        st.idle = 0 if a else st.idle
        st.alpha = (1 - self.EMA) * st.alpha + self.EMA * (a / k)
        self.alpha0 = (1 - self.EMA) * self.alpha0 + self.EMA * (a / k)
        st.k = self._run_k(st.alpha)
        if a == k:  # every draft kept: try one more next time
            st.k = max(st.k, min(self.config.k, k + 1))


def spec_stats(counters: Sequence[SpecCounters]) -> dict[str, Any]:
    """Engine-wide speculation figures from the decoding workers' counters: proposed and accepted
    draft tokens, acceptance_rate (accepted / proposed), mean_accepted_length (tokens a row gained
    per verification in which it had drafts: accepted + 1), verify and decode calls."""
    total = SpecCounters(**{f.name: sum(getattr(c, f.name) for c in counters) for f in dataclasses.fields(SpecCounters)})
    return dict(
        spec_proposed_tokens=total.proposed_tokens,
        spec_accepted_tokens=total.accepted_tokens,
        acceptance_rate=total.accepted_tokens / total.proposed_tokens if total.proposed_tokens else 0.0,
        mean_accepted_length=(total.accepted_tokens + total.verified_rows) / total.verified_rows if total.verified_rows else 0.0,
        spec_verify_calls=total.verify_calls,
        spec_decode_calls=total.decode_calls,
    )
