"""Speculative decoding's exactness matrix: proposer x model family x layout.

Every cell: greedy tokens with speculation equal the same deployment's tokens without it, and the
cell cannot pass vacuously (verify calls ran with drafts; n-gram cells kept some, an equal draft all,
the draft model and EAGLE-3 cells rolled some back).

  proposers: "ngram:2" (prompt lookup; the prompt repeats), "draft:DIR:2" (the target's first L - 1
             layers as draft, so mostly rejected: rollbacks; for Llama 4 with its chunked attention
             turned off), "eagle3:DIR:2" (a random one-layer head in the published layout reading
             three target layers; rarely right), "equal" ("draft:DIR:2" with the target itself as
             draft: every proposal kept; Llama 4 as a draft is refused, its ring layers would be
             overwritten by rolled-back drafts: the SpecError is asserted instead).
  families:  dense Llama (tiny-llama), Llama 4 (ring / chunked + global NoPE layers, MoE), DeepSeek
             MLA (latent cache, MoE), Qwen3-MoE (q/k norm, MoE).
  layouts:   colocated tp=1, tp=2, pp=2; P/D with prefill pp=2 on devices 0-1 and decode tp=2 on 2-3
             (the KV crosses layouts; draft and head sit beside the decode mesh, and the prefill worker
             prefills and ships the draft model's KV).

`--spec-matrix=full` (tests/conftest.py) runs every cell: 4 x 4 x 4 = 64 (the 48 of the three
proposers and the equal draft's 16). CI runs 16: the Latin square proposer = SQUARE[(family index +
layout index) mod 4], in which every (family, layout) pair appears once and every family and every
layout meets every proposer once (each row and column of the square holds all four); SQUARE's order
makes only one of its cells (draft, llama, tp1) one that test_speculative*.py runs already. Every
decode call with drafts verifies (`adaptive = False`). One Deployment per (family, layout) serves its
reference and its proposers, so they share compiled programs (every proposer drafts K = 2 tokens:
the same verify widths); a group's programs are dropped when the next group starts (a full run
that kept them all died in XLA's CPU compiler, a segfault, after 37 cells).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import pathlib

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from infire_jax.engine.build import Deployment, EngineOptions
from infire_jax.engine.disagg import generate
from infire_jax.engine.sampling import per_request
from infire_jax.engine.speculative import SpecError
from tests.helpers import write_head

OPTIONS = EngineOptions(kv_pages=64, page_size=16, max_decode_batch=4, decode_steps=2, prefill_chunk=None)
NEW, K = 12, 2

FAMILIES = {"llama": "tiny-llama", "llama4": "llama4", "deepseek": "deepseek_v3", "qwen3_moe": "tiny-qwen3-moe"}
LAYOUTS = {"tp1": ("tp=1", None), "tp2": ("tp=2", None), "pp2": ("pp=2", None), "pd": ("pp=2@0-1", "tp=2@2-3")}
PROPOSERS = ("ngram", "draft", "eagle3", "equal")
SQUARE = ("draft", "equal", "ngram", "eagle3")

FULL = [(p, f, lay) for f in FAMILIES for lay in LAYOUTS for p in PROPOSERS]
CI = [(SQUARE[(i + j) % 4], f, lay) for i, f in enumerate(FAMILIES) for j, lay in enumerate(LAYOUTS)]


def pytest_generate_tests(metafunc):
    if "cell" in metafunc.fixturenames:
        cells = FULL if metafunc.config.getoption("spec_matrix") == "full" else CI
        metafunc.parametrize("cell", cells, ids=["-".join(c) for c in cells])


def test_the_ci_subset_covers_every_pair():
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert {(c[a], c[b]) for c in CI} == {(x[a], x[b]) for x in FULL}


def _prompts() -> list[list[int]]:
    """One prompt of 16 tokens with recurring n-grams (ids < 150: every family's vocabulary). One row:
    fewer batch shapes to compile (batches of rows with different draft counts: test_speculative.py)."""
    base = np.random.default_rng(0).integers(3, 150, 5).tolist()
    return [base * 3 + base[:1]]


def first_layers(src: pathlib.Path, dst: pathlib.Path, n: int, **config) -> pathlib.Path:
    """A checkpoint of `src`'s embedding, first n layers, final norm and LM head (config changes applied)."""
    dst.mkdir(parents=True)
    cfg = json.loads((src / "config.json").read_text())
    per_layer = {key: cfg[key][:n] for key in ("layer_types", "no_rope_layers") if key in cfg}
    indices = {key: [i for i in cfg[key] if i < n] for key in ("moe_layers", "mlp_only_layers") if cfg.get(key)}
    cfg |= dict(num_hidden_layers=n) | per_layer | indices | config
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors |= load_file(str(f))
    keep = {k: v for k, v in tensors.items() if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n)}
    save_file(keep, str(dst / "model.safetensors"))
    return dst


# per family: the target layers the EAGLE-3 head reads (every one of the 3-layer DeepSeek; Llama 4's
# ring and global layers) and the draft model's config changes
AUX = {"llama": [1, 2, 3], "llama4": [1, 2, 3], "deepseek": [0, 1, 2], "qwen3_moe": [1, 2, 3]}
DRAFT_CONFIG = {"llama4": dict(attention_chunk_size=None)}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, checkpoints):
    root, made = tmp_path_factory.mktemp("matrix"), {}

    def get(family: str, what: str = "target") -> pathlib.Path:
        if (family, what) not in made:
            target = checkpoints(FAMILIES[family])
            layers = json.loads((target / "config.json").read_text())["num_hidden_layers"]
            made[family, what] = {
                "target": lambda: target,
                "equal": lambda: target,
                "draft": lambda: first_layers(target, root / f"{family}_draft", layers - 1, **DRAFT_CONFIG.get(family, {})),
                "eagle3": lambda: write_head(root / f"{family}_head", target, seed=3,
                                             config=dict(eagle_aux_hidden_state_layer_ids=AUX[family])),
            }[what]()
        return made[family, what]

    return get


@pytest.fixture(scope="module")
def deployments(dirs):
    """The Deployment of a (family, layout); the previous one's programs are dropped (module doc)."""
    made = {}

    def get(family: str, layout: str) -> Deployment:
        if (family, layout) not in made:
            made.clear()
            gc.collect()
            jax.clear_caches()
            prefill, decode = LAYOUTS[layout]
            made[family, layout] = Deployment(dirs(family), [prefill], [decode or prefill], options=OPTIONS)
        return made[family, layout]

    return get


@pytest.fixture(scope="module")
def plain(deployments):
    """Greedy tokens without speculation per (family, layout), once per module."""
    made = {}

    def get(family: str, layout: str) -> list[list[int]]:
        if (family, layout) not in made:
            reqs = generate(deployments(family, layout).engine(), _prompts(), per_request(1, NEW))
            made[family, layout] = [r.output for r in reqs]
        return made[family, layout]

    return get


def _run(deployment: Deployment, speculative: str):
    """Generate with every decode call that has drafts verifying; the requests and the engine's stats."""
    engine = deployment.engine(dataclasses.replace(OPTIONS, speculative=speculative))
    for w in engine.decode_workers:
        w.speculator.adaptive = False
    reqs = generate(engine, _prompts(), per_request(1, NEW))
    assert all(r.status == "done" for r in reqs), [r.error for r in reqs]
    return reqs, engine.stats()


def test_speculation_gives_the_tokens_of_plain_decoding(cell, dirs, deployments, plain):
    proposer, family, layout = cell
    method = {"ngram": "ngram", "eagle3": "eagle3"}.get(proposer, "draft")
    spec = f"ngram:{K}" if method == "ngram" else f"{method}:{dirs(family, proposer)}:{K}"
    if proposer == "equal" and family == "llama4":
        with pytest.raises(SpecError, match="windowed .chunked. attention layers"):
            _run(deployments(family, layout), spec)
        return
    reqs, stats = _run(deployments(family, layout), spec)
    assert [r.output for r in reqs] == plain(family, layout)
    assert stats["spec_verify_calls"] > 0 and stats["spec_proposed_tokens"] > 0
    assert sum(r.metrics()["proposed_tokens"] for r in reqs) == stats["spec_proposed_tokens"]
    assert sum(r.metrics()["accepted_tokens"] for r in reqs) == stats["spec_accepted_tokens"]
    if proposer == "ngram":  # the prompt repeats, and the models repeat it: some drafts kept
        assert stats["spec_accepted_tokens"] > 0
    if proposer in ("draft", "eagle3"):  # drafts the target disagrees with: rollbacks ran
        assert stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"]
    if proposer == "equal":
        assert stats["acceptance_rate"] == 1.0 and stats["mean_accepted_length"] > 2.0
    if proposer in ("draft", "equal") and layout == "pd":  # the prefill worker prefilled the draft's KV, shipped it
        assert stats["draft_prefill_tokens"] == sum(len(r.prompt) for r in reqs)
        assert 0 < stats["draft_fed_tokens"] <= sum(len(r.output) - 1 for r in reqs)
