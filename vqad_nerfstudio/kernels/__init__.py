"""GPU kernels (Triton) for the hot paths; each has a PyTorch reference that CPU runs use and tests compare."""
