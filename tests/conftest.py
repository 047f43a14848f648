"""Test set-up: 8 simulated CPU devices (set before any JAX computation) and shared fixtures."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")
