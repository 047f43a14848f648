"""Test set-up: 8 simulated CPU devices (set before any JAX computation) and shared fixtures."""

import pytest
import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")


def pytest_addoption(parser):
    parser.addoption("--spec-matrix", choices=("ci", "full"), default="ci",
                     help="tests/test_speculative_matrix.py: 'ci' runs the covering subset (every pair of proposer, "
                          "family and layout once), 'full' every proposer x family x layout cell")


def _write_checkpoint(tmp_path_factory, name: str):
    from infire_jax.checkpoint.tiny import write_tiny_checkpoint

    out = tmp_path_factory.mktemp(name)
    if name in ("llama4", "deepseek_v3"):  # the MoE reference models (random weights, transformers' layout)
        from tests.reference.test_moe_reference import save_moe_reference

        save_moe_reference(name, out)
    else:
        write_tiny_checkpoint(out, name, tokenizer=False)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """checkpoints(name) -> a tiny checkpoint directory, written once per test module."""
    made = {}
    return lambda name: made.get(name) or made.setdefault(name, _write_checkpoint(tmp_path_factory, name))
