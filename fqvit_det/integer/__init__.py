"""Integer execution of calibrated models (issue #8): integer kernels and the integer model."""
