"""Argument checks shared by the benchmark scripts.

A benchmark's list options (``--modes plain,fused``) are checked when argparse reads them,
so a mistyped item stops the run at once, with argparse's message naming the option and
the item, before a model is built or a device is touched. This matters most on the GPU
machine, whose script (benchmarks/gpu/run_all.sh) has minutes per session;
tests/test_gpu_script.py parses every command of that script this way.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable


def comma_list(choices: Iterable | None = None, item: Callable = str) -> Callable[[str], str]:
    """An argparse ``type`` for a comma-separated list. Each item must convert with ``item``
    (int, a shape parser, ...) and, when ``choices`` is given, be one of them. It returns
    the text unchanged (the script splits it where it always did); an empty text stays
    allowed (the scripts read it as "the default list")."""
    allowed = None if choices is None else tuple(choices)

    def check(text: str) -> str:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            try:
                value = item(part)
            except (ValueError, SystemExit) as exc:
                raise argparse.ArgumentTypeError(f"{part!r}: {exc or 'not a valid item'}") from None
            if allowed is not None and value not in allowed:
                raise argparse.ArgumentTypeError(
                    f"{part!r}: choose among {', '.join(map(str, allowed))}")
        return text

    return check


def dims(count: int, low: int = 1) -> Callable[[str], list[tuple[int, ...]]]:
    """An argparse ``type`` for a comma-separated list of shapes of ``count`` integers
    joined by ``x`` (``2048x1024,8192x256``), each at least ``low``. It returns the list of
    tuples; a malformed item or a size below ``low`` stops the run at once, naming it."""

    def parse(text: str) -> list[tuple[int, ...]]:
        out = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            fields = part.lower().split("x")
            if len(fields) != count:
                raise argparse.ArgumentTypeError(
                    f"{part!r}: expected {count} sizes joined by 'x' (e.g. {'x'.join(['64'] * count)})")
            try:
                sizes = tuple(int(f) for f in fields)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part!r}: the sizes must be integers") from None
            if min(sizes) < low:
                raise argparse.ArgumentTypeError(f"{part!r}: every size must be >= {low}")
            out.append(sizes)
        if not out:
            raise argparse.ArgumentTypeError(f"{text!r}: no shape given")
        return out

    return parse


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
    return value


def positive_int(text: str) -> int:
    """An argparse ``type`` for counts (repeats, steps, calls): an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse ``type`` for counts that may be 0 (warm-up steps)."""
    return _int_at_least(text, 0)


def out_folder(text: str):
    """An argparse ``type`` for an output folder: refused at once (not after the timing) when
    a file is in the way of it or of a folder above it (``models.trainer.check_output_dir``,
    the trainer's own check)."""
    from pathlib import Path

    from models.config import UserError
    from models.trainer import check_output_dir

    try:
        check_output_dir(text)
    except UserError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {str(exc).split(': ', 1)[1]}") from None
    return Path(text)


def require_device(device: str) -> None:
    """One line, before any work, where --device cuda cannot run here."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device on this machine")
