"""Hypothesis profiles: ``HYPOTHESIS_PROFILE=ci|dev|thorough`` (default ``dev``).

* ``ci``: 40 examples per property, derandomized (same examples every run), no deadline.
* ``dev``: as ``ci`` but random, so repeated local runs explore new examples.
* ``thorough``: 400 examples per property (``make test-thorough``).
"""

import os
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# tests/ on the path for the helpers (fx_checks, onnx_checks, rules.rule_table) from subfolders
sys.path.insert(0, str(Path(__file__).resolve().parent))

# the layered tests run tiny graphs: one thread each (intra-op threads only contend for ops
# this small, badly so on a loaded machine); the zoo, bench and export tests keep torch's own
ONE_THREAD_FOLDERS = {"core", "rules", "fx", "onnx"}


@pytest.fixture(autouse=True, scope="module")
def one_thread_for_small_graphs(request):
    if request.path.parent.name not in ONE_THREAD_FOLDERS:
        yield
        return
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
