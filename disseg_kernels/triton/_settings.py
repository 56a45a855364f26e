"""Process-wide settings of the Triton kernels, read from the environment once, at import.

- ``INTERPRET``: TRITON_INTERPRET=1. Triton itself reads it when it decorates a kernel
  (interpreted or compiled is fixed then), so reading it again per call could only
  disagree with the kernels; and an environment read costs a few µs, paid per launch by
  the host-bound ops (the model's gates and TeLU on a GPU).
- ``AUTOTUNE``: DISSEG_TRITON_AUTOTUNE (default on; never under the interpreter). Code that
  must turn it off after import (a benchmark's launch stubs) sets ``AUTOTUNE = False``.
"""

from __future__ import annotations

import os

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE: bool = not INTERPRET and os.environ.get("DISSEG_TRITON_AUTOTUNE", "1") != "0"


def interpret() -> bool:
    return INTERPRET


def autotune_enabled() -> bool:
    return AUTOTUNE
