"""disseg-kernels: fused kernels for Med-DisSeg (dispersive loss, attention calibration,
window attention), each with a plain-PyTorch reference, C++ CPU, Triton and CUDA
backends chosen in one place (``disseg_kernels._backend``)."""

from ._backend import BACKENDS, BackendUnavailable, available_backends  # noqa: F401
from .ops.dispersive import DispersiveLoss, dispersive_loss  # noqa: F401
from .ops.gates import CBAM, ELAT, CBATGates, ChannelAttention, SpatialAttention  # noqa: F401
from .ops.multiscale import multiscale_concat  # noqa: F401
from .ops.telu import TeLU, telu  # noqa: F401
from .ops.window_attention import ContrastDrivenFeatureAggregation, window_attention  # noqa: F401

__version__ = "0.1.0"
from .distributed import DistributedDispersiveLoss, distributed_dispersive_loss  # noqa: F401,E402
from .bank import NegativeBank, dispersive_loss_with_bank  # noqa: F401,E402
