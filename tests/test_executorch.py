"""ExecuTorch lowering of fused models: XNNPACK programs run in ExecuTorch's runtime and
compared with torch, Core ML programs checked for their delegate, errors that say what
went wrong, files written whole or not at all."""

from __future__ import annotations

import builtins
import os

import pytest
import torch
import torch.nn as nn

import reparam_fx
from reparam_fx.export import ExportError, check_executorch, run_pte, to_executorch
from reparam_fx.testing import randomize_batchnorm_

pytest.importorskip("executorch")

RTOL_FP32 = 1e-5


class Block(nn.Module):
    """A RepVGG-style block (3x3+BN, 1x1+BN, identity BN, summed) and a head: fused, one
    conv and a linear."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(channels))
        self.point = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False),
                                   nn.BatchNorm2d(channels))
        self.identity = nn.BatchNorm2d(channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels, 4)

    def forward(self, x):
        y = torch.relu(self.dense(x) + self.point(x) + self.identity(x))
        return self.head(self.pool(y).flatten(1))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    model = randomize_batchnorm_(Block().eval(), seed=1)
    return model, reparam_fx.fuse(model), torch.randn(1, 8, 12, 12)


def test_xnnpack_program_runs_like_torch_and_is_fully_delegated(models, tmp_path):
    model, fused, x = models
    check = check_executorch(fused, (x,))
    assert check.relative_error is not None and check.relative_error <= RTOL_FP32
    assert check.fully_delegated, (check.delegated, check.portable)
    assert check.delegated["convolution"] + check.delegated["conv2d"] == 1
    assert check.pte_bytes > 0
    path = to_executorch(fused, (x,), tmp_path / "block.xnnpack.pte")
    assert path == tmp_path / "block.xnnpack.pte"
    (out,) = run_pte(path, (x,))
    expected = model(x)
    assert float((out - expected).abs().max() / expected.abs().max()) <= RTOL_FP32
    assert sorted(os.listdir(tmp_path)) == ["block.xnnpack.pte"]  # nothing staged left


def test_ops_xnnpack_does_not_take_are_reported():
    class Mean(nn.Module):  # XNNPACK takes mean over the spatial axes only with keepdim
        def forward(self, x):
            return torch.relu(x).mean((2, 3))

    check = check_executorch(Mean().eval(), (torch.randn(1, 3, 4, 4),))
    assert check.portable == {"mean": 1} and not check.fully_delegated
    assert check.relative_error <= RTOL_FP32


def test_training_form_lowers_to_more_delegated_ops(models):
    model, fused, x = models
    train, done = check_executorch(model, (x,)), check_executorch(fused, (x,))
    assert sum(train.delegated.values()) > sum(done.delegated.values())
    assert train.relative_error <= RTOL_FP32


def test_aten_graph_from_the_export_path_lowers_too(models):
    model, _, x = models
    fused = reparam_fx.fuse(torch.export.export(model, (x,)))
    check = check_executorch(fused, (x,))
    assert check.fully_delegated and check.relative_error <= RTOL_FP32


def test_coreml_program_carries_the_core_ml_delegate(models, tmp_path):
    _, fused, x = models
    check = check_executorch(fused, (x,), backend="coreml", precision="fp32")
    assert check.backend == "coreml" and check.relative_error is None  # (runs on Apple only)
    assert check.fully_delegated
    assert check.delegated["convolution"] + check.delegated["conv2d"] == 1
    path = to_executorch(fused, (x,), tmp_path / "block.coreml.pte", backend="coreml")
    assert path.stat().st_size > 0


def test_bad_options_and_training_mode_are_refused(models):
    model, fused, x = models
    with pytest.raises(ValueError, match="backend must be one of xnnpack, coreml"):
        check_executorch(fused, (x,), backend="vulkan")
    with pytest.raises(ValueError, match="precision"):
        check_executorch(fused, (x,), backend="coreml", precision="int8")
    training = Block().train()
    with pytest.raises(ExportError, match="is in training mode"):
        to_executorch(training, (x,), "unused.pte")
    assert training.training and not os.path.exists("unused.pte")


def test_lowering_failure_names_the_model_and_writes_nothing(tmp_path):
    class Bad(nn.Module):
        def forward(self, x):
            return torch.relu(x) if x.sum() > 0 else x  # data-dependent: export refuses

    target = tmp_path / "bad.pte"
    target.write_bytes(b"an old program")
    with pytest.raises(ExportError, match=r"ExecuTorch lowering \(xnnpack\) of Bad failed"):
        to_executorch(Bad().eval(), (torch.randn(1, 3),), target)
    assert target.read_bytes() == b"an old program"
    assert sorted(os.listdir(tmp_path)) == ["bad.pte"]


def test_unwritable_target_is_a_clear_error(models, tmp_path):
    _, fused, x = models
    with pytest.raises(ExportError, match="could not write"):
        to_executorch(fused, (x,), tmp_path / "missing" / "block.pte")


def test_missing_executorch_says_which_extra_to_install(models, monkeypatch):
    _, fused, x = models
    real_import = builtins.__import__

    def no_executorch(name, *args, **kwargs):
        if name.startswith("executorch"):
            raise ImportError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_executorch)
    with pytest.raises(ExportError, match=r"pip install 'reparam-fx\[executorch\]'"):
        to_executorch(fused, (x,), "unused.pte")


def test_program_gets_the_usual_file_mode(models, tmp_path):
    _, fused, x = models
    umask = os.umask(0)
    os.umask(umask)
    path = to_executorch(fused, (x,), tmp_path / "block.pte")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
