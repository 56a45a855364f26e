"""Plain-PyTorch references: the executable form of ``shared/spec``."""

from .dispersive import (  # noqa: F401
    DIAGONALS,
    VARIANTS,
    dispersive_loss_reference,
    eager_dispersive_loss,
    pairwise_distance,
)
