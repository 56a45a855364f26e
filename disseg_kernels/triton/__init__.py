"""Triton kernels. Imported lazily by the ops, so the package works without triton."""
