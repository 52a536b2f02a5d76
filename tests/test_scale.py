"""Fusing at scale, checked at small scale: the guarantees the memory work must keep.

* torch: a weight is computed only for the regions written, once each, and the caller's
  tensors are read, never copied until then or changed;
* ONNX files are read weightless (``onnx_io.load_weightless``: stubs pointing into the
  file) and written tensor by tensor (``save_streaming``), inline or with external data,
  to the same model ``onnx.load`` / ``onnx.save`` give;
* the command line fuses a RepVGG chain with external data (``tools/bench_scale.py``'s
  generator, at a few KB instead of 2 GB) exactly, writes its fused weights once, and
  leaves the input untouched.

The full-size figures (RepVGG-B3, a 2 GB chain) live in ``make bench-scale``, not here.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import reparam_fx
from reparam_fx.core import affine
from reparam_fx.testing import randomize_batchnorm_

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx_graphsurgeon")
ort = pytest.importorskip("onnxruntime")

from reparam_fx.onnx import io as onnx_io  # noqa: E402
from reparam_fx.onnx import fuse_onnx_model, verify_onnx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from bench_scale import write_repvgg_chain  # noqa: E402
sys.path.insert(0, str(ROOT / "tests"))
from reference.models import repvgg_tiny  # noqa: E402


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _loaded(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path))  # with its external data


def _ops(model) -> dict:
    counts = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ---- torch: weights computed once, for written regions only ---------------------------

def test_fused_weights_are_computed_once_per_written_region(monkeypatch):
    model = repvgg_tiny().double().eval()
    randomize_batchnorm_(model, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    summed = affine._summed_weights
    monkeypatch.setattr(affine, "_summed_weights",
                        lambda *args: calls.append(1) or summed(*args))
    fused = reparam_fx.fuse(model)
    report = fused.fusion_report
    merged = sum(1 for region in report.fused if region.pattern == "repvgg")
    # one merged kernel per RepVGG block written, none for the candidates the walk
    # composed on the way (conv+BN, the 1x1 branch ...)
    blocks = sum(1 for m in model.modules() if type(m).__name__ == "RepVGGBlock")
    assert merged == blocks == 7 and len(calls) == merged
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert reparam_fx.verify(model, fused, (x,), rtol=1e-10) <= 1e-10


def test_weights_are_read_from_the_model_not_copied_by_the_walk():
    weight = torch.randn(8, 4, 3, 3)
    scale = torch.rand(8, dtype=torch.float64) + 0.5
    term = affine.conv(weight, None, 1, 1, 1, 1)
    scaled = affine.compose(term, affine.channel_affine(scale))
    assert term.weight._source().data_ptr() == weight.data_ptr()  # read, not copied
    value = scaled.weight.value()
    assert value.dtype == torch.float64 and value.data_ptr() != weight.data_ptr()
    assert torch.equal(value, weight.double() * scale.view(8, 1, 1, 1))
    value.zero_()  # the caller owns what value() returns: the next call computes again
    assert torch.equal(scaled.weight.value(), weight.double() * scale.view(8, 1, 1, 1))


def test_a_refused_merge_computes_no_weight(monkeypatch):
    """The MAC gate and the other exactness checks read shapes and biases only."""
    monkeypatch.setattr(affine.Weight, "value", lambda self: pytest.fail("weight computed"))
    depthwise = affine.conv(torch.randn(8, 1, 3, 3), None, 1, 1, 1, 8)
    pointwise = affine.conv(torch.randn(8, 8, 1, 1), None, 1, 0, 1, 1)
    with pytest.raises(affine.NotExact, match="MACs"):
        affine.merge([depthwise, pointwise], [1, 1])
    merged = affine.merge([affine.conv(torch.randn(8, 8, 3, 3), torch.randn(8), 1, 1, 1, 1),
                           pointwise, affine.channel_affine(torch.rand(8))], [1, 1, -1])
    assert merged.weight.shape == (8, 8, 3, 3) and merged.bias is not None


# ---- ONNX files read weightless and written tensor by tensor --------------------------

@pytest.fixture
def exported(tmp_path):
    model = repvgg_tiny().eval()
    randomize_batchnorm_(model, seed=5)
    path = tmp_path / "model.onnx"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), str(path), dynamo=False,
                          opset_version=17)
    return path


def test_weightless_model_points_at_the_bytes_of_each_tensor(exported):
    original = onnx.load(str(exported))
    weightless = onnx_io.load_weightless(str(exported))
    store = onnx_io.WeightStore(str(exported.parent))
    stubs = [t for t in weightless.graph.initializer if onnx_io.is_stored(t)]
    assert stubs and weightless.ByteSize() < original.ByteSize() / 10
    by_name = {t.name: t for t in original.graph.initializer}
    for stub in stubs:
        assert len(by_name[stub.name].raw_data) >= onnx_io.STUB_BYTES
        assert np.array_equal(store.read(stub), onnx.numpy_helper.to_array(by_name[stub.name]))
    # everything but the data is the same message: inlined again, it serializes the same
    for tensor in weightless.graph.initializer:
        if onnx_io.is_stored(tensor):
            store.inline(tensor)
    assert [t.SerializeToString() for t in weightless.graph.initializer] == \
        [t.SerializeToString() for t in original.graph.initializer]
    assert [n.SerializeToString() for n in weightless.graph.node] == \
        [n.SerializeToString() for n in original.graph.node]


@pytest.mark.parametrize("external", [False, True])
def test_streaming_save_writes_the_model_onnx_save_would(exported, tmp_path, external):
    weightless = onnx_io.load_weightless(str(exported))
    store = onnx_io.WeightStore(str(exported.parent))
    out = tmp_path / "out" / "copy.onnx"
    out.parent.mkdir()
    onnx_io.save_streaming(weightless, str(out), store, external_data=external,
                           data_name="copy.onnx.data", size_threshold=1024)
    assert (out.parent / "copy.onnx.data").exists() == external
    copy, original = _loaded(out), onnx.load(str(exported))
    onnx.checker.check_model(str(out))
    assert [n.SerializeToString() for n in copy.graph.node] == \
        [n.SerializeToString() for n in original.graph.node]
    values = {t.name: onnx.numpy_helper.to_array(t) for t in copy.graph.initializer}
    for tensor in original.graph.initializer:
        assert np.array_equal(values[tensor.name], onnx.numpy_helper.to_array(tensor))


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_a_truncated_file_is_a_decode_error(exported, tmp_path, cut):
    from google.protobuf.message import DecodeError
    data = exported.read_bytes()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(DecodeError):
        onnx_io.load_weightless(str(broken))


def test_library_fusion_leaves_the_input_proto_untouched(exported):
    model = onnx.load(str(exported))
    before = model.SerializeToString()
    fused, report = fuse_onnx_model(model)
    assert model.SerializeToString() == before
    assert _ops(fused).get("BatchNormalization", 0) == 0 and report.fused
    assert not any(onnx_io.is_stored(t) for t in fused.graph.initializer)
    assert verify_onnx(model, fused, rtol=1e-5) <= 1e-5


# ---- the command line on a chain with external data (the 2 GB benchmark, tiny) --------

def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "fuse_onnx.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_external_data_chain_fuses_exactly_with_weights_written_once(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    path = source / "chain.onnx"
    data_bytes = write_repvgg_chain(str(path), blocks=3, channels=16, size=6)
    assert (source / "chain.onnx.data").stat().st_size == data_bytes
    before = _snapshot(source)
    out = tmp_path / "out" / "fused.onnx"
    out.parent.mkdir()
    result = run_cli(path, "-o", out, "--verify", "--rtol", "1e-5")
    assert result.returncode == 0, result.stderr
    assert _snapshot(source) == before  # input and its data untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "fused.onnx.data"]
    fused, original = _loaded(out), _loaded(path)
    assert _ops(original)["BatchNormalization"] == 9 and _ops(original)["Conv"] == 6
    assert _ops(fused) == {"Conv": 3, "Relu": 3}
    # the data file holds exactly the fused tensors: the three merged kernels (written
    # as they were computed) and their biases; nothing twice
    kernels = 3 * 16 * 16 * 9 * 4
    assert kernels <= (out.parent / "fused.onnx.data").stat().st_size <= kernels + 3 * 16 * 4
    assert verify_onnx(original, fused, rtol=1e-5) <= 1e-5


def test_inline_output_matches_the_library_result(exported, tmp_path):
    out = tmp_path / "fused.onnx"
    result = run_cli(exported, "-o", out)
    assert result.returncode == 0, result.stderr
    from_cli = onnx.load(str(out))
    from_library, _ = fuse_onnx_model(onnx.load(str(exported)))
    assert [n.op_type for n in from_cli.graph.node] == [n.op_type for n in from_library.graph.node]
    library = {t.name: onnx.numpy_helper.to_array(t) for t in from_library.graph.initializer}
    for tensor in from_cli.graph.initializer:
        assert np.array_equal(onnx.numpy_helper.to_array(tensor), library[tensor.name])
    assert not os.path.exists(str(out) + ".data")


def test_external_data_of_the_wrong_size_is_refused_before_reading(tmp_path):
    path = tmp_path / "chain.onnx"
    write_repvgg_chain(str(path), blocks=1, channels=8)
    model = onnx.load(str(path), load_external_data=False)
    entry = next(e for e in model.graph.initializer[0].external_data if e.key == "length")
    entry.value = str(int(entry.value) - 4)
    path.write_bytes(model.SerializeToString())
    before = _snapshot(tmp_path)
    result = run_cli(path, "-o", tmp_path / "fused.onnx")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "claims 2300 bytes of external data but its shape and type need 2304" in result.stderr
    assert _snapshot(tmp_path) == before


def test_the_checker_still_sees_the_whole_graph_of_a_weightless_model(exported, tmp_path):
    """Large initializers are graph inputs while onnx.checker runs, so a broken graph is
    still refused: here a node reads a tensor nothing defines."""
    model = onnx.load(str(exported))
    model.graph.node[1].input[0] = "nowhere"
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(model.SerializeToString())
    result = run_cli(broken, "-o", tmp_path / "fused.onnx")
    assert result.returncode == 2, result.stderr
    assert "is not a valid ONNX model" in result.stderr and "nowhere" in result.stderr
    assert not (tmp_path / "fused.onnx").exists()


def test_bench_scale_quick_mode_measures_every_job(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_scale.py"), "--quick",
                             "--repeats", "1", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    import json
    data = json.loads((tmp_path / "bench_scale.json").read_text())
    jobs = {(row["model"], row["job"]) for row in data["torch"]}
    assert jobs == {("repvgg_a0", "fuse"), ("repvgg_a0", "hand"),
                    ("mobileone_s0", "fuse"), ("mobileone_s0", "hand")}
    assert all(row["seconds"] > 0 and row["peak_above_model_mb"] > 0 for row in data["torch"])
    assert [row["job"] for row in data["onnx"]] == ["onnx.load + onnx.save",
                                                   "tools/fuse_onnx.py"] * 2
    assert all(row["peak_rss_mb"] > 0 and row["size_mb"] > 0 for row in data["onnx"])
    fused = onnx.load(str(tmp_path / "repvgg_chain_2x64.fused.onnx"))
    assert {n.op_type for n in fused.graph.node} == {"Conv", "Relu"}
    assert "| repvgg_a0 | fuse |" in (tmp_path / "bench_scale.md").read_text()


def test_float16_model_is_read_raw_and_fuses_quietly(tmp_path):
    """float16 (like bfloat16 and float8) is stored as its little-endian array: read
    straight from the file, no warning; its external-data size is checked too."""
    model = randomize_batchnorm_(repvgg_tiny().eval(), seed=7).half()
    path = tmp_path / "half.onnx"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, 32, 32).half(),), str(path), dynamo=False,
                          opset_version=17)
    out = tmp_path / "fused.onnx"
    result = run_cli(path, "-o", out, "--verify", "--rtol", "1e-2")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    fused = onnx.load(str(out))
    assert "BatchNormalization" not in _ops(fused)
    weights = [t for t in fused.graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    from_library, _ = fuse_onnx_model(onnx.load(str(path)))
    library = {t.name: onnx.numpy_helper.to_array(t) for t in from_library.graph.initializer}
    for tensor in fused.graph.initializer:
        assert np.array_equal(onnx.numpy_helper.to_array(tensor), library[tensor.name])
