"""Kernels: Triton for CUDA, a native vectorized path for CPU, each with a pure-torch reference."""
