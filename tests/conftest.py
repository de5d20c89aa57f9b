"""Shared fixtures: an isolated plugin system per test that registers things, hypothesis profile."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from diffit_toolkit.registry import PluginSystem, use_plugin_system

# CPU tests: no deadline (2 shared cores make timings noisy); examples stay modest per test.
settings.register_profile(
    "ci", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def plugin_system():
    """A fresh plugin system (entry points loaded anew) that is discarded after the test."""
    system = PluginSystem()
    with use_plugin_system(system):
        yield system
    system.pm.check_pending()
