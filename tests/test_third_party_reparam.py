"""The corpus's own baselines are right: each entry's ``reparameterize`` (the library's
deploy conversion, re-written in tests/third_party) equals its training form in float64
with randomised BatchNorm statistics, and the entry builds and runs as declared."""

import copy

import pytest
import torch

from reparam_fx.core.verification import relative_error

from third_party import CORPUS, example_input, randomized_model

RTOL_F64 = 1e-10


@pytest.mark.parametrize("name", sorted(n for n, i in CORPUS.items() if i.reparameterize))
def test_own_reparameterization_is_exact(name):
    idiom = CORPUS[name]
    model = randomized_model(idiom)
    x = example_input(idiom)
    with torch.no_grad():
        expected = model(x)
        deployed = idiom.reparameterize(copy.deepcopy(model))
        got = deployed.eval()(x)
    error = relative_error(expected, got)  # (detectors return tuples and dicts)
    assert error <= RTOL_F64, error


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_declared_capture(name):
    idiom = CORPUS[name]
    model = randomized_model(idiom)
    x = example_input(idiom)
    try:
        torch.fx.symbolic_trace(model)
        traced = True
    except Exception:  # noqa: BLE001
        traced = False
    assert traced == idiom.traceable
    if idiom.exportable:
        torch.export.export(model, (x,))
