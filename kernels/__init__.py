"""Triton kernels for ProGrad (installed as prograd_fast.kernels)."""
