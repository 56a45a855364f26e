"""The benchmarks' argument types refuse bad values at parse time, naming them.

A shape of size 0 or a head count that does not divide the channels used to pass argparse
and fail minutes later (after the eager baseline had run) with a kernel's message; on the
GPU machine that costs a stage. These are the shared types of ``benchmarks/_args.py``.
"""
from __future__ import annotations

import argparse

import pytest

from benchmarks._args import comma_list, dims, non_negative_int, positive_int


@pytest.mark.parametrize("text, expected", [
    ("2048x1024,8192x256", [(2048, 1024), (8192, 256)]),
    ("8X262144", [(8, 262144)]),
    (" 4x4 , ", [(4, 4)]),
])
def test_dims_parses_shapes(text, expected):
    assert dims(2)(text) == expected


@pytest.mark.parametrize("text, message", [
    ("0x8", "'0x8': every size must be >= 1"),
    ("8x", "'8x': the sizes must be integers"),
    ("4x4x4", "'4x4x4': expected 2 sizes"),
    ("", "no shape given"),
])
def test_dims_names_the_bad_item(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        dims(2)(text)


def test_dims_of_three_for_bank_shapes():
    assert dims(3)("2048x256x4096") == [(2048, 256, 4096)]
    with pytest.raises(argparse.ArgumentTypeError, match="expected 3 sizes"):
        dims(3)("2048x256")


def test_counts_and_lists():
    assert positive_int("3") == 3 and non_negative_int("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match="0 must be >= 1"):
        positive_int("0")
    with pytest.raises(argparse.ArgumentTypeError, match="-1 must be >= 0"):
        non_negative_int("-1")
    with pytest.raises(argparse.ArgumentTypeError, match="'x' is not an integer"):
        positive_int("x")
    check = comma_list(("a", "b"))
    assert check("a,b") == "a,b"
    with pytest.raises(argparse.ArgumentTypeError, match="'c': choose among a, b"):
        check("a,c")
    with pytest.raises(argparse.ArgumentTypeError, match="0 must be >= 1"):
        comma_list(item=positive_int)("16,0")


def test_window_attention_heads_must_divide_channels(capsys):
    from benchmarks import bench_window_attention

    with pytest.raises(SystemExit):
        bench_window_attention.main(["--heads", "3", "--channels", "128", "--no-write"])
    assert "--heads 3 must divide --channels 128" in capsys.readouterr().err


@pytest.mark.parametrize("module, argv, message", [
    ("bench_dispersive", ["--shapes", "0x8"], "'0x8': every size must be >= 1"),
    ("bench_dispersive_tiles", ["--splits", "1,-1"], "-1 must be >= 0"),
    ("bench_window_attention", ["--sizes", "16,0"], "0 must be >= 1"),
])
def test_scripts_refuse_before_work(module, argv, message, capsys):
    import importlib

    mod = importlib.import_module(f"benchmarks.{module}")
    parser = mod.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert message in capsys.readouterr().err
