"""benchmarks/gpu/run_all.sh's Python command lines parse, on the CPU.

The GPU script runs in one call of a few minutes on a machine lent for 15 minutes a
session; a flag that a benchmark does not know (renamed, mistyped, a choice removed) costs
that stage's whole result and shows only there. This test reads every stage's command,
expands the script's variables and shell loops as bash would, and hands each
``$PY -m <module> ...`` argument list to that module's own argparse, stopping right after
the parse: nothing is benchmarked, and no GPU is needed.
"""
from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run_all.sh"
SKIP_MODULES = {"pytest"}  # its own suite; the tests stage runs it


def _stages() -> list[tuple[str, str]]:
    text = SCRIPT.read_text()
    variables = dict(re.findall(r'^([A-Z_][A-Z0-9_]*)="([^"]*)"$', text, re.M))
    variables.pop("PY", None)  # kept as the marker of a Python command
    stages = re.findall(r'^\s*"(\w+)\|\d+\|(.*)"\s*$', text, re.M)
    assert stages, f"no stage lines found in {SCRIPT}"
    out = []
    for name, cmd in stages:
        cmd = cmd.replace("\\$", "$")
        for _ in range(3):  # variables that hold variables ($BENCH_D holds $PY)
            cmd = re.sub(r"\$([A-Z_][A-Z0-9_]*)", lambda m: variables.get(m.group(1), m.group(0)), cmd)
        cmd = re.sub(r"\$\([^()]*\)", "", cmd)  # command substitutions: optional extra flags
        cmd = cmd.replace("$OUT", "/tmp/run_all_out")
        loop = re.search(r"for (\w+) in ([^;]+); do (.*); done", cmd)
        if loop:
            var, values, body = loop.groups()
            for value in values.split():
                out.append((f"{name}[{value}]", body.replace(f"${var}", value)))
        else:
            out.append((name, cmd))
    return out


def _python_commands() -> list[tuple[str, str, list[str]]]:
    """(stage, module, argv) for every `$PY -m module args...` of every stage."""
    found = []
    for stage, cmd in _stages():
        lexer = shlex.shlex(cmd, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        for i, tok in enumerate(tokens):
            if tok != "$PY" or i + 2 >= len(tokens) or tokens[i + 1] != "-m":
                continue
            j = i + 2
            if tokens[j] == "torch.distributed.run":  # the launcher's own flags, then -m module
                j = tokens.index("-m", j) + 1
            module, args = tokens[j], []
            rest = tokens[j + 1:]
            for k, arg in enumerate(rest):
                redirect = arg.isdigit() and k + 1 < len(rest) and rest[k + 1][:1] in "<>"  # 2>&1
                if redirect or set(arg) <= set(";|&<>()"):
                    break
                args.append(arg)
            if module not in SKIP_MODULES:
                found.append((stage, module, args))
    return found


class _Parsed(Exception):
    pass


COMMANDS = _python_commands()


def test_the_script_has_python_commands():
    """The parsing above finds the benchmark stages (a change of the script's format would
    otherwise leave the test below with nothing to check)."""
    modules = {m for _, m, _ in COMMANDS}
    assert {"benchmarks.bench_dispersive", "benchmarks.bench_gates", "benchmarks.bench_models",
            "benchmarks.bench_dispersive_tiles", "models.cli"} <= modules, modules
    assert len(COMMANDS) >= 15, COMMANDS


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy of an imported module
@pytest.mark.parametrize("stage,module,argv", COMMANDS, ids=[f"{s}:{m}" for s, m, _ in COMMANDS])
def test_gpu_script_command_parses(stage, module, argv, monkeypatch):
    """Each command's arguments pass its module's argparse (a wrong flag or choice exits 2
    with argparse's message, which this test shows)."""
    real_parse = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, args=None, namespace=None):
        ns, extra = real_parse(self, args, namespace)  # a subcommand's parser stops here too
        if extra:
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        raise _Parsed(ns)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [module, *argv])
    with pytest.raises(_Parsed):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            pytest.fail(f"stage {stage}: `python -m {module} {shlex.join(argv)}` does not parse (exit {exc.code})")
