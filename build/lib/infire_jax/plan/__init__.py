"""Planning on paper: capacity (what fits where, from the real model built abstractly), a roofline
cost model, a discrete-event prefill/decode cluster simulator, and calibration of the cost model
against the engine's measured step times on this CPU.

  plan.hardware   catalog (H100, H200, this CPU) and CPU measurement
  plan.capacity   per-device weights / KV / reserved memory from nnx.eval_shape of the family class
  plan.simulator  step costs, workloads, the P/D simulator, plan search
  plan.calibrate  predicted vs measured engine step times here
"""

from infire_jax.plan.capacity import (
    ConfigError,
    Deployment,
    CapacityPlan,
    PlanError,
    build_abstract,
    candidate_meshes,
    load_hf_config,
    model_config,
    plan_best,
    plan_capacity,
)
from infire_jax.plan.hardware import CATALOG, Hardware, HardwareError, get_hardware

__all__ = [
    "CATALOG",
    "CapacityPlan",
    "ConfigError",
    "Deployment",
    "Hardware",
    "HardwareError",
    "PlanError",
    "build_abstract",
    "candidate_meshes",
    "get_hardware",
    "load_hf_config",
    "model_config",
    "plan_best",
    "plan_capacity",
]
