"""Triton kernels (installed as ``lce.kernels``). Importing this package has no side effects."""
