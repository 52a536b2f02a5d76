"""Hypothesis profiles: ``HYPOTHESIS_PROFILE=ci|dev|thorough`` (default ``dev``).

* ``ci``: 40 examples per property, derandomized (same examples every run), no deadline.
* ``dev``: as ``ci`` but random, so repeated local runs explore new examples.
* ``thorough``: 400 examples per property (``make test-thorough``).
"""

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=40, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# tests/ on the path for the helpers (fx_checks, onnx_checks, rules.rule_table) from subfolders
sys.path.insert(0, str(Path(__file__).resolve().parent))
