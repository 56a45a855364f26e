"""No host synchronisation inside a training step.

On a GPU, reading a value back to the host (``.item()``, ``float(t)``, ``if t:``,
``.cpu()``, ``nonzero``) or building a tensor from host data (``torch.tensor(...,
device=cuda)``) synchronises the stream: the host stops issuing work until the device has
drained its queue. One such wait between the forward and the backward serialises the
host's launch work with the device's compute, and a fused step is host-bound, so it pays
in full; inside a CUDA-graph capture it is an error. These ops are visible on the CPU too,
as ATen calls, so this runs anywhere.

Protects: the model's forward and both stages' losses and their backward issue none of
them (plain and fused); the trainer's step reads the loss back once, after the backward has
been issued (before it, the check made the host wait for the whole forward), and its
non-finite check still raises before the weights change.
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_model
from models import data as D
from models.losses import stage1_loss, stage2_loss
# ATen ops that read device memory on the host or copy host data to the device: the set a
# CUDA-graph capture refuses (--cuda-graph's emulation refuses them too)
from models.step_graph import SYNCING_OPS as SYNC_OPS


class _Recorder(TorchDispatchMode):
    """Every ATen op in order, plus ``.cpu()`` calls (a no-op on a CPU tensor, so they
    are recorded from Python as "cpu()")."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.paused = False
        self._cpu = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(func._schema.name.split("::")[-1])
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        recorder, cpu = self, torch.Tensor.cpu

        def recorded_cpu(t, *a, **k):
            if not recorder.paused:
                recorder.ops.append("cpu()")
            return cpu(t, *a, **k)

        self._cpu = cpu
        torch.Tensor.cpu = recorded_cpu
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.cpu = self._cpu
        return super().__exit__(*exc)

    def syncs(self, start: str, end: str) -> list[str]:
        """Sync-type ops between the first ``start`` op and the last ``end`` op."""
        i = self.ops.index(start)
        j = len(self.ops) - 1 - self.ops[::-1].index(end)
        return [op for op in self.ops[i:j + 1] if op in SYNC_OPS or op == "cpu()"]


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("path", ["plain", "cpu", "triton"])
def test_forward_loss_backward_issue_no_sync(stage, path):
    """path: the model's plain PyTorch ops, or the fused ops on the C++ kernels or on the
    Triton kernels (under the interpreter on the CPU: the same Python glue as on a GPU)."""
    from disseg_kernels import _backend

    if path == "triton" and _backend.unavailable_reason("gates", "triton", torch.device("cpu")):
        pytest.skip(_backend.unavailable_reason("gates", "triton", torch.device("cpu")))
    fused = path != "plain"
    with contextlib.ExitStack() as stack:
        if fused:
            stack.enter_context(_backend.auto_order("cpu", (path,)))
        if path == "triton":
            # The interpreter would take minutes over a whole network: the launches are
            # stubbed (integer outputs zeroed so index math stays in range, the rest left
            # unwritten). What is recorded is every ATen op the glue issues around them.
            import triton.runtime.interpreter as interp

            mp = stack.enter_context(pytest.MonkeyPatch.context())
            mp.setattr(interp.InterpretedFunction, "run", _stub_launch)
        _LAUNCHES.clear()
        _step_without_sync(stage, fused)
    if path == "triton":
        assert len(_LAUNCHES) > 50  # the fused ops did run on the Triton path


_LAUNCHES: list = []


def _stub_launch(self, *args, **kwargs):
    _LAUNCHES.append(self)
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor) and not t.is_floating_point():
            t.zero_()


def _step_without_sync(stage, fused):
    torch.manual_seed(0)
    model = build_model(stage, encoder="resnet18", fused=fused).train()
    x = torch.rand(2, 3, 32, 32)
    y = (torch.rand(2, 1, 32, 32) > 0.5).float()
    D.normalize(x, "imagenet")  # its constants are made once per device, outside the step
    rec = _Recorder()
    with rec:
        out = model(D.normalize(x, "imagenet"))
        if stage == 1:
            loss, _ = stage1_loss(out, model(D.normalize(x.flip(-1), "imagenet")), y, 0.1)
        else:
            loss, _ = stage2_loss(out, y, 0.1)
        loss.backward()
    assert "convolution_backward" in rec.ops  # the recording saw the backward
    syncs = [op for op in rec.ops if op in SYNC_OPS or op == "cpu()"]
    assert syncs == [], f"stage {stage} fused={fused}: host syncs in the step: {syncs}"


def test_losses_make_no_host_tensor():
    """Both stages' losses, with and without a dispersive term: their counts and zeros are
    made on the loss's device (the earlier ``torch.tensor(n, device=...)`` was a host copy)."""
    from models import SegOutput

    m = torch.randn(2, 1, 8, 8)
    rec = _Recorder()
    for disp in (None, torch.tensor(-3.0)):
        out = SegOutput(mask=m, fg=m, bg=m, uncertainty=m, disp_loss=disp)
        with rec:
            stage2_loss(out, (m > 0).float(), 0.1)
            stage1_loss(out, out, (m > 0).float(), 0.1)
    assert not [op for op in rec.ops if op in SYNC_OPS]


def _trainer(data, out, stage):
    from models.config import TrainConfig
    from models.trainer import Trainer

    cfg = TrainConfig(data=data, out=str(out), encoder="resnet18", size=32, batch_size=2, epochs=1, threads=1,
                      progress=False, seed=0, stage=stage, dropout_size=4).validate()
    t = Trainer(cfg, log=lambda s: None)
    t.setup()
    return t


@pytest.mark.parametrize("stage", [1, 2])
def test_train_step_reads_back_only_after_backward(tiny_data, tmp_path, stage):
    t = _trainer(tiny_data, tmp_path / f"s{stage}", stage)
    x, y, idx = next(iter(t._loader(t.train_ds, t.sampler)))
    t.train_step(x, y, idx)  # first step: lazy state (optimizer, caches) made outside the recording
    if stage == 1:
        # the strong copy is drawn on the host by design (its own draws are host reads):
        # recorded as one event, its input already on the host
        real = D.strong_photometric

        def aug(xh, *a, **k):
            rec.ops.append("strong_photometric")
            rec.paused = True
            try:
                return real(xh, *a, **k)
            finally:
                rec.paused = False

        D.strong_photometric = aug
    rec = _Recorder()
    try:
        with rec:
            t.train_step(x, y, idx)
    finally:
        if stage == 1:
            D.strong_photometric = real
    syncs = rec.syncs("convolution", "convolution_backward")
    assert syncs == [], f"stage {stage}: host syncs between the first forward op and the last backward op: {syncs}"


def test_non_finite_loss_raises_before_the_weights_change(tiny_data, tmp_path):
    t = _trainer(tiny_data, tmp_path / "nan", 2)
    x, y, idx = next(iter(t._loader(t.train_ds, t.sampler)))
    before = {k: v.clone() for k, v in t.model.state_dict().items() if v.is_floating_point()}
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite training loss nan at epoch 1, batch 0: parts \{'mask'"):
        t.train_step(x, y, idx)
    after = t.model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k]) and "running" not in k]
    assert changed == []  # BatchNorm's running statistics move in any forward; nothing else may


def test_strong_copy_in_a_helper_thread_is_the_same(tiny_data, tmp_path):
    """On CUDA, Stage I draws its strong copy in a helper thread while the main thread issues
    the first forward. Forced on here: the thread's copy, and a whole step's loss and
    weights, are bitwise those of the in-thread path (the copy's draws come from its own
    per-sample generators, never from a shared RNG)."""
    results = []
    for in_thread in (False, True):
        t = _trainer(tiny_data, tmp_path / f"aug{in_thread}", 1)
        t._aug_thread = in_thread
        x, y, idx = next(iter(t._loader(t.train_ds, t.sampler)))
        gens = lambda: [torch.Generator().manual_seed(int(i)) for i in idx]  # noqa: E731
        fut = t._strong_copy(x, gens())
        if not in_thread:
            assert fut.done()  # computed at once, in this thread
        copy = fut.result()
        loss, _ = t.train_step(x, y, idx)
        results.append((copy, loss, [p.detach().clone() for p in t.model.parameters()]))
        if in_thread:
            assert t._aug_pool is not None  # the helper thread was used
    (c0, l0, p0), (c1, l1, p1) = results
    assert torch.equal(c0, c1) and l0 == l1
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
