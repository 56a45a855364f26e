"""Shared by the pytest-benchmark cases (benchmarks/test_bench_*.py; not part of `make test`)."""

import pytest


@pytest.fixture(autouse=True)
def _needs_the_plugin(request):
    """Skip (not error) where pytest-benchmark is installed but not loaded (-p no:benchmark,
    PYTEST_DISABLE_PLUGIN_AUTOLOAD=1): its `benchmark` fixture is then missing."""
    if "benchmark" in request.fixturenames and not request.config.pluginmanager.hasplugin("benchmark"):
        pytest.skip("the pytest-benchmark plugin is not loaded")
