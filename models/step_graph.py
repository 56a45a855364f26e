"""A training step's forward, loss and backward, captured once as a CUDA graph and replayed.

Why: on a GPU the fused model's step is host-bound. Its ~2,200 operations (477 Triton
launches; ``python -m benchmarks.bench_host_overhead --ops stage2``) each cost the host more
than the device spends on them, so the H200 ran the fused Stage II step in about the plain
one's wall time although its device time was about half (docs/results.md, "Stage II
training step, GPU"). A replay issues the whole forward and backward with one call.

What is captured: ``body(*inputs)``, which runs the forward, the loss and ``backward()`` and
returns a tuple of tensors (the loss, its parts, the predictions the metrics read). What
stays eager, outside the graph: copying the batch into the graph's input tensors, the
optimizer step, gradient clipping, the finiteness check and the metrics, which read the
graph's outputs after the replay.

The recipe (PyTorch's "CUDA Graphs" notes, whole-network capture):
- warm-up runs on a side stream first (Triton compiles and autotunes, cuDNN picks its
  algorithms, autograd makes its streams); module buffers (BatchNorm's running
  statistics) and the RNG states are saved before them and restored after, so the
  warm-up leaves no trace in the training;
- the gradients are set to None before the capture, so the captured backward allocates
  them in the graph's memory; every replay rewrites them there (they are not accumulated),
  and ``param.grad`` keeps pointing at them. Code that steps eagerly in between (a batch
  of another shape) must zero them in place (``zero_grad(set_to_none=False)``), never
  drop them: ``StepGraph.replay`` checks that;
- the fused ops' ``backend="auto"`` chooses as for captured code, by device time
  (``disseg_kernels._backend.captured_auto_order``: Triton first on CUDA, where eager
  steps put the CUDA kernels of TeLU, the gates and the multi-scale concat first for their
  cheaper launches); warm-up and capture both run under it, so both use the same kernels;
- nothing inside may synchronise the host with the device (``.item()``, ``.cpu()``, a
  tensor built from host data) or change a shape: the trainer's step is free of both
  (``tests/test_sync_free.py``).

``emulate=True`` runs the same bookkeeping without a GPU, for tests: the "capture" runs
the body once under a recorder that raises on the operations a real capture refuses, then
restores every buffer and RNG state as a capture (which executes nothing) would leave them;
a "replay" runs the body again and copies its results into the captured tensors, which is
what a real replay's writes amount to.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from disseg_kernels._backend import captured_auto_order

# ATen ops that read device memory on the host or copy host data to the device: a CUDA
# capture fails on them (emulate=True raises on them too)
SYNCING_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "nonzero", "lift_fresh", "lift_fresh_copy", "equal",
                         "masked_select", "_unique2", "unique_consecutive", "item"})


class CaptureError(RuntimeError):
    """The step cannot be captured; the message says what inside it stopped the capture."""


def _signature(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.stride(), t.device


class StepGraph:
    """``body`` captured for inputs of one signature (shape, dtype, strides, device).

    ``params``: the parameters whose gradients the body's backward writes; ``modules``:
    the modules whose buffers the warm-up must leave unchanged. After ``capture(*inputs)``,
    ``replay(*inputs)`` returns the body's outputs (the same tensors every time,
    overwritten by each replay: read them before the next one).
    """

    def __init__(self, body: Callable[..., Sequence[torch.Tensor]], params: Sequence[torch.nn.Parameter],
                 modules: Sequence[torch.nn.Module], *, warmup: int = 3, emulate: bool = False):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (Triton and cuDNN choose their kernels there), got {warmup}")
        self.body, self.params, self.modules = body, list(params), list(modules)
        self.warmup, self.emulate = warmup, emulate
        self.graph = None
        self.static_inputs: tuple[torch.Tensor, ...] = ()
        self.outputs: tuple[torch.Tensor, ...] = ()
        self.grads: list = []
        self.replays = 0

    # ------------------------------------------------------------------ state the warm-up must not change
    def _snapshot(self) -> tuple[list, dict]:
        buffers = [b.detach().clone() for m in self.modules for b in m.buffers()]
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return buffers, rng

    def _restore(self, snap: tuple[list, dict]) -> None:
        buffers, rng = snap
        with torch.no_grad():
            for b, saved in zip((b for m in self.modules for b in m.buffers()), buffers):
                b.copy_(saved)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _grads_to_none(self) -> None:
        for p in self.params:
            p.grad = None

    # ------------------------------------------------------------------ capture and replay
    def matches(self, *inputs: torch.Tensor) -> bool:
        """True when ``inputs`` have the captured inputs' shapes, dtypes, strides and devices."""
        return (len(inputs) == len(self.static_inputs)
                and all(_signature(a) == _signature(s) for a, s in zip(inputs, self.static_inputs)))

    def capture(self, *inputs: torch.Tensor) -> None:
        """Warm up, then capture ``body`` on copies of ``inputs`` (which it leaves unchanged)."""
        if self.graph is not None:
            raise RuntimeError("StepGraph.capture: already captured (make a new StepGraph for another signature)")
        if not self.emulate and not all(t.is_cuda for t in inputs):
            raise CaptureError("a CUDA graph needs CUDA inputs, got devices "
                               f"{sorted({str(t.device) for t in inputs})}")
        self.static_inputs = tuple(t.detach().clone(memory_format=torch.preserve_format) for t in inputs)
        snap = self._snapshot()
        with captured_auto_order():
            if self.emulate:
                self._emulated_capture(snap)
            else:
                self._cuda_capture(snap)
        self.grads = [p.grad for p in self.params]

    def _cuda_capture(self, snap) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self._grads_to_none()
                self.body(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self._restore(snap)  # the warm-up's BatchNorm updates and random draws
        self._grads_to_none()
        torch.cuda.empty_cache()  # the warm-up's cached blocks: the graph allocates from its own pool
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records, executes nothing
                self.outputs = tuple(t.detach() for t in self.body(*self.static_inputs))
        except RuntimeError as exc:
            self._grads_to_none()
            raise CaptureError(f"the training step could not be captured as a CUDA graph: {exc}") from exc
        self.graph = graph

    def _emulated_capture(self, snap) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        class _RefuseSyncs(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name.split("::")[-1]
                if name in SYNCING_OPS:
                    raise CaptureError(f"the training step could not be captured as a CUDA graph: aten::{name} "
                                       "reads device memory on the host (or copies host data to the device), "
                                       "which a capture does not allow")
                return func(*args, **(kwargs or {}))

        for _ in range(self.warmup):
            self._grads_to_none()
            self.body(*self.static_inputs)
        self._restore(snap)
        self._grads_to_none()
        with _RefuseSyncs():
            self.outputs = tuple(t.detach() for t in self.body(*self.static_inputs))
        self._restore(snap)  # a real capture executes nothing
        self.graph = "emulated"

    def replay(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Copy ``inputs`` into the captured inputs, run the captured step, return its outputs."""
        if self.graph is None:
            raise RuntimeError("StepGraph.replay before capture")
        if not self.matches(*inputs):
            raise ValueError("StepGraph.replay: inputs "
                             f"{[_signature(t)[:3] for t in inputs]} do not match the captured "
                             f"{[_signature(t)[:3] for t in self.static_inputs]}")
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                raise RuntimeError("StepGraph.replay: a parameter's .grad was replaced since the capture (an eager "
                                   "step must zero the gradients in place, zero_grad(set_to_none=False)); the "
                                   "graph would write the old tensor and the optimizer would read the new one")
        with torch.no_grad():
            for s, t in zip(self.static_inputs, inputs):
                s.copy_(t, non_blocking=True)
        if self.emulate:
            with captured_auto_order():  # the kernels a real replay runs: the captured ones
                self._emulated_replay()
        else:
            self.graph.replay()
        self.replays += 1
        return self.outputs

    def _emulated_replay(self) -> None:
        self._grads_to_none()
        try:
            outputs = self.body(*self.static_inputs)
            with torch.no_grad():
                for s, t in zip(self.outputs, outputs):
                    s.copy_(t)
                for p, g in zip(self.params, self.grads):
                    if g is not None:
                        g.copy_(p.grad)
        finally:
            for p, g in zip(self.params, self.grads):
                p.grad = g
