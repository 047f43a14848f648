"""Calibrate the planner's cost model against the engine on this CPU (infire_jax.plan.calibrate).

  python experiments/calibrate_plan.py --out=/tmp/calibrate_plan.json

Writes smollm-135m-shaped tiny checkpoints (deterministic random weights: 8 and 30 layers, and a
narrower 16-layer model with hidden 384), times the engine's compiled prefill and decode programs,
measures this CPU's bandwidth and matmul rates, and prints predicted vs measured step times:
"roofline" (measured rates only) and "calibrated" (plus two engine-on-CPU constants fitted on the
reference model's cases; the other models are held out). The process is pinned to one core and
times are process CPU time (this machine is shared; see the module docstring of plan/calibrate.py).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "calibrate_plan.json", "Write the report JSON here.")
flags.DEFINE_integer("runs", 5, "Timed runs per case (median).")
flags.DEFINE_string("root", None, "Where the tiny checkpoints are written (default: a temp dir).")
flags.DEFINE_string("models", None, "Comma-separated subset of smollm-L8,smollm-L30,smollm-L16-D384.")
flags.DEFINE_bool("wall", False, "Wall time on all cores instead of CPU time on one core.")


def main(argv) -> int:
    del argv
    args = FLAGS

    from infire_jax.plan import calibrate as cal

    if not args.wall:
        cal.pin_one_core()  # before JAX starts its threads
    else:
        import time

        cal.CLOCK[0] = time.perf_counter
    cases = cal.DEFAULT_CASES
    if args.models:
        keep = set(args.models.split(","))
        cases = tuple(c for c in cases if c.name in keep)
    out = cal.calibrate(cases, root=args.root, runs=args.runs)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"held out: {out['held_out_within_25pct']}/{out['held_out_cases']} within +-25% "
          f"(median |error| {100 * (out['held_out_median_abs_error'] or 0):.0f}%); all: {out['all_within_25pct']}/"
          f"{out['cases']}; roofline alone: {out['roofline_within_25pct']}/{out['cases']}; fitted {out['fitted']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    app.run(main)
