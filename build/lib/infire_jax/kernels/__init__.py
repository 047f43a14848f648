"""Hand-written kernels for backends where XLA's own code is the bottleneck (the floor below models)."""
