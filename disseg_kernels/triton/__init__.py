"""Triton kernels. Imported lazily by the ops, so the package works without triton."""

# The dispersive row kernel's names (``dispersive._rows_kernel_choice`` / ``_rows_loop_choice``),
# here so that a benchmark can check them without importing triton (an import before
# TRITON_INTERPRET is set would leave the kernels compiled for a GPU).
ROWS_KERNELS = ("triton", "sm90")
ROWS_LOOPS = ("segments", "one")
