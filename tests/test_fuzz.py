"""The seeded differential fuzzer (``tests/fuzzing.py``): a bounded run over every capture,
and tests of the fuzzer itself (it finds a planted bug, shrinks it, prints reproducers
that run, and is deterministic). The long run is ``make fuzz`` / ``tools/fuzz.py``."""

import contextlib
import io
import warnings

import numpy as np
import pytest
import torch

import fuzzing
import reparam_fx
from fuzzing import Program, Statement, options

# ---- the bounded run -------------------------------------------------------------------

# every capture of seeds 0..31, except the slow one (core ATen: run_decompositions takes
# ~0.7 s a program) on seeds 0..15: about 20 s on one core (with this file's other tests,
# under 30 s). 12 of them are whole programs (routing loops, heads: fuzzing.Frame, Head)
BOUNDED_SEEDS = range(0, 32)
CORE_SEEDS = range(0, 16)

# (seed, capture) -> the failure seen when the mark was added. Each is a real bug, not yet
# fixed: the mark is strict, so the test fails (XPASS) once the bug is fixed - then delete
# the entry.
KNOWN_FAILURES: dict[tuple[int, str], str] = {}


def _bounded_cases():
    for seed in BOUNDED_SEEDS:
        for capture in fuzzing.CAPTURES:
            if capture == "core" and seed not in CORE_SEEDS:
                continue
            reason = KNOWN_FAILURES.get((seed, capture))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(seed, capture, marks=marks, id=f"{seed}-{capture}")


@pytest.mark.parametrize("seed, capture", list(_bounded_cases()))
def test_bounded_fuzz(seed, capture):
    program = fuzzing.generate_program(seed)
    opts = fuzzing.capture_options(seed, capture)
    try:
        finding = fuzzing.check_capture(program, capture, opts)
    except fuzzing.Skip as skip:
        pytest.skip(str(skip))
    if finding is not None and (seed, capture) in KNOWN_FAILURES:
        pytest.fail(f"{finding.kind}: {finding.message} (known)", pytrace=False)
    if finding is not None:
        small, small_opts, small_finding, _ = fuzzing.shrink(program, capture, opts, finding,
                                                             max_checks=60, time_limit=20.0)
        pytest.fail(f"{small_finding.kind}: {small_finding.message}\n\nminimal reproducer:\n"
                    + fuzzing.reproducer(small, capture, small_opts, small_finding), pytrace=False)


# ---- determinism and coverage ----------------------------------------------------------

def test_same_seed_same_program():
    for seed in (0, 7, 123):
        first = fuzzing._generate(seed, 0)
        assert fuzzing._generate(seed, 0) == first
        assert fuzzing.generate_program(seed).source() == fuzzing.generate_program(seed).source()
    sources = {fuzzing.generate_program(seed).source() for seed in range(20)}
    assert len(sources) == 20


def test_same_seed_same_weights_and_inputs():
    program = fuzzing.generate_program(5)
    model_a, inputs_a = fuzzing.build(program)
    model_b, inputs_b = fuzzing.build(program)
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert all(torch.equal(a, b) for a, b in zip(inputs_a, inputs_b))


def test_generated_programs_use_every_op_kind():
    kinds = {s.kind for seed in range(300) for s in fuzzing.generate_program(seed).statements}
    assert kinds == set(fuzzing.OPS)


# every whole-program style (fuzzing.Frame, the head op) the generator writes
WHOLE_PROGRAM_STYLES = (
    {"frame", "routed", "frame-untraceable", "head", "head-stem"}
    | {f"signature:{s}" for s in ("plain", "augment", "args-kwargs", "super")}
    | {f"loop:{s}" for s in ("for", "enumerate", "index", "slice-head")}
    | {f"profile:{s}" for s in ("dead", "visualize", "live")}
    | {f"isinstance:{s}" for s in ("absent", "module", "layer")}
    | {f"head:{s}" for s in fuzzing.Head.STYLES}
    | {f"head-guard:{s}" for s in ("shape-cache", "grid", "odd", "none")}
    | {f"head-hazard:{s}" for s in ("passed", "reused", "isinstance", "append", "rewrite", "unbatch")}
    | {f"head-call:{s}" for s in ("read-after", "twice")})


def test_generated_programs_use_every_whole_program_style():
    seen = set().union(*(fuzzing.generate_program(seed).features() for seed in range(400)))
    assert WHOLE_PROGRAM_STYLES <= seen, f"never generated: {sorted(WHOLE_PROGRAM_STYLES - seen)}"
    whole = [seed for seed in BOUNDED_SEEDS if fuzzing.generate_program(seed).features()]
    assert len(whole) >= 6, "the bounded run should include whole programs"


def _program(*statements, outputs=None, seed=1, frame=None):
    return Program(seed, 2, 4, ((8, 8), (7, 9)), tuple(statements), outputs or (statements[-1].output,),
                   frame=frame)


CONV3 = options(kernel=3, stride=1, dilation=1, groups=1, bias=False, padding=1)
BN = options(eps=1e-5, act=False)

# the shapes of bugs found before this fuzzer existed: the IR must be able to say them
KNOWN_BUG_SHAPES = {
    # out = self.id(x); out += self.bn(self.conv(x)); return out + x
    "alias-iadd": _program(Statement("identity", "v1", ("x",), "module"),
                           Statement("conv", "v2", ("x",), "module", CONV3),
                           Statement("batchnorm", "v3", ("v2",), "module", BN),
                           Statement("inplace-add", "v4", ("v1", "v3"), "alias-iadd"),
                           Statement("add", "v5", ("v4", "x"), "plus")),
    # y = self.bn(x); out = self.drop(y); out.add_(y); return out + self.conv(y)
    "dropout-add_": _program(Statement("batchnorm", "v1", ("x",), "module", BN),
                             Statement("identity", "v2", ("v1",), "dropout", options(p=0.1)),
                             Statement("inplace-add", "v3", ("v2", "v1"), "add_"),
                             Statement("conv", "v4", ("v1",), "module", CONV3),
                             Statement("add", "v5", ("v3", "v4"), "plus")),
    # t = x.movedim(1, -1); return (self.fc(t.reshape(t.shape)) * 2.0).movedim(-1, 1)
    "linear-reshape-shape": _program(Statement("to-last", "v1", ("x",), "movedim"),
                                     Statement("linear", "v2", ("v1",), "reshape-shape", options(bias=True)),
                                     Statement("scale", "v3", ("v2",), "scalar-mul", options(value=2.0)),
                                     Statement("to-first", "v4", ("v3",), "movedim")),
    # t = self.conv(x).movedim(1, -1); return self.bn(t.flatten(0, -2)).reshape_as(t).movedim(-1, 1)
    "bn1d-tokens": _program(Statement("conv", "v1", ("x",), "module", CONV3),
                            Statement("to-last", "v2", ("v1",), "movedim"),
                            Statement("batchnorm1d", "v3", ("v2",), "flatten-reshape_as"),
                            Statement("to-first", "v4", ("v3",), "movedim")),
    # nn.AvgPool2d(2, 1)(F.pad(x, (2, 2)))
    "pad-avgpool": _program(Statement("pad", "v1", ("x",), "functional",
                                      options(pads=(2, 2), mode="constant", value=0.0)),
                            Statement("avgpool", "v2", ("v1",), "module",
                                      options(kernel=2, stride=1, padding=0, count_include_pad=True))),
}


HEAD = options(out_channels=6, kernel=1, padding=0, groups=1, bias=True, ia=True, im=True, bn=True,
               stem=("conv", "bn"), none_call=True, guard="shape-cache", hazard="none", target=0.0, call="plain")

# a YOLO-style whole program: forward(x, augment=False, profile=False, visualize=False), a
# routing loop that does not trace over Layer1 (conv, BN), Layer2 (conv, BN) and a head of
# its own (IDetect's chain ia -> m -> bn -> im per level, a conv -> BN stem, anchors cached)
# fed from layers 1 and 2 (m.f == [1, -1]), a dead profile branch
WHOLE_PROGRAM = _program(
    Statement("conv", "v1", ("x",), "module", CONV3),
    Statement("batchnorm", "v2", ("v1",), "module", BN),
    Statement("conv", "v3", ("v2",), "module", CONV3),
    Statement("batchnorm", "v4", ("v3",), "module", BN),
    Statement("head", "v5", ("v2", "v4"), "chain", HEAD),
    frame=fuzzing.Frame(signature="augment", guard="too-large", layers=(("v1", "v2"), ("v3", "v4"), ("v5",)),
                        profile="dead", check="absent", direct=True))


def test_whole_programs_render_as_detectors_and_fuse_inside():
    source = WHOLE_PROGRAM.source()
    for text in ("def forward(self, x, augment=False, profile=False, visualize=False):",
                 "x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]",
                 "layers = [Layer0(), Layer1(), Head5()]", "froms = [-1, -1, [0, -1]]",
                 "x[i] = self.m[i](self.ia[i](x[i]))", "s = self.stem_conv(x[0])",
                 "self._profile_one_layer(m, x, dt)", "if isinstance(m, (Detect, Segment)):"):
        assert text in source, text
    assert fuzzing.eager_error(WHOLE_PROGRAM) is None
    for capture in ("fx", "fx-inputs", "export"):
        assert fuzzing.check_capture(WHOLE_PROGRAM, capture, ()) is None, capture
    model, _ = fuzzing.build(WHOLE_PROGRAM)
    report = reparam_fx.fuse(model).fusion_report
    fused = {region.module.split(".")[1] for region in report.fused if region.module.startswith("model.")}
    assert {"0", "1", "2"} <= fused, report.table()  # both layers and the head's children


def test_shrinking_simplifies_and_removes_a_frame():
    candidates = [p for p, _ in fuzzing.shrink_candidates(WHOLE_PROGRAM, ())]
    assert any(c.frame is None for c in candidates)
    assert any(c.frame and len(c.frame.layers) == 2 for c in candidates)  # two layers merged
    assert any(c.frame and c.frame.guard == "none" for c in candidates)
    shorter = [c for c in candidates if len(c.statements) == 4]
    assert shorter and all(sum(map(len, c.frame.layers)) == 4 for c in shorter)
    for candidate in candidates:
        if fuzzing.eager_error(candidate) is None:
            compile(candidate.source(), "<candidate>", "exec")
    renamed = fuzzing.renumbered(WHOLE_PROGRAM)
    assert renamed.source() == WHOLE_PROGRAM.source()


@pytest.mark.parametrize("name", sorted(KNOWN_BUG_SHAPES))
def test_known_bug_shapes_are_expressible(name):
    program = KNOWN_BUG_SHAPES[name]
    assert fuzzing.eager_error(program) is None
    kinds = {(s.kind, s.style) for s in program.statements}
    generated = {(s.kind, s.style) for seed in range(400) for s in fuzzing.generate_program(seed).statements}
    assert kinds <= generated, f"the generator never writes {kinds - generated}"


def test_source_reads_like_code():
    source = KNOWN_BUG_SHAPES["alias-iadd"].source()
    assert "self.id1 = nn.Identity()" in source
    assert "        v4 = v1\n        v4 += v3\n        v5 = v4 + x\n" in source
    compile(source, "<program>", "exec")


# ---- the fuzzer finds, shrinks and reproduces a planted bug ----------------------------

def _perturbing(fuse):
    """``fuse`` with a planted bug: the first floating-point tensor of the result is 1%
    too large."""
    def planted(model, *args, **kwargs):
        fused = fuse(model, *args, **kwargs)
        with torch.no_grad():
            for tensor in list(fused.parameters()) + list(fused.buffers()):
                if tensor.is_floating_point() and tensor.numel() > 1:
                    tensor.mul_(1.01)
                    break
        return fused
    return planted


def _run_script(source: str) -> str:
    output = io.StringIO()
    with contextlib.redirect_stdout(output), warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore")
        exec(compile(source, "<reproducer>", "exec"), {"__name__": "__reproducer__"})
    return output.getvalue()


def test_detects_and_shrinks_a_planted_bug(monkeypatch):
    monkeypatch.setattr(reparam_fx, "fuse", _perturbing(reparam_fx.fuse))
    for seed in range(100):
        program = fuzzing.generate_program(seed)
        if len(program.statements) < 4 or not any(s.kind == "conv" for s in program.statements):
            continue
        result = fuzzing.fuzz_seed(seed, ("fx",))
        if result.failures:
            break
    else:
        pytest.fail("the planted bug was never found")
    failure = result.failures[0]
    assert failure.kind == "wrong-values"
    assert failure.statements < failure.original_statements
    assert failure.statements <= 2
    assert "FAIL seed=" in failure.line()
    # the reproducer is a script that fails while the bug is there ...
    with pytest.raises(AssertionError, match="fuse changed the values"):
        _run_script(failure.reproducer)
    # ... and runs clean once it is gone
    monkeypatch.undo()
    assert "relative error" in _run_script(failure.reproducer)


def test_detects_a_planted_onnx_bug(monkeypatch):
    fuse_onnx_model = reparam_fx.fuse_onnx_model

    def planted(model, **kwargs):
        fused, report = fuse_onnx_model(model, **kwargs)
        from onnx import numpy_helper
        for index, tensor in enumerate(fused.graph.initializer):
            array = numpy_helper.to_array(tensor)
            if array.dtype == np.float32 and array.size > 1:
                fused.graph.initializer[index].CopyFrom(numpy_helper.from_array(array * 1.01, tensor.name))
                break
        return fused, report

    monkeypatch.setattr(reparam_fx, "fuse_onnx_model", planted)
    program = KNOWN_BUG_SHAPES["alias-iadd"]
    opts = options(opset=17, constant_folding=False, dynamic=True, training=False)
    finding = fuzzing.check_capture(program, "onnx", opts)
    assert finding is not None and finding.kind == "wrong-values"
    small, small_opts, small_finding, _ = fuzzing.shrink(program, "onnx", opts, finding)
    assert len(small.statements) < len(program.statements)
    assert dict(small_opts)["dynamic"] is False  # options simplified too
    script = fuzzing.reproducer(small, "onnx", small_opts, small_finding)
    with pytest.raises(AssertionError, match="fuse_onnx_model changed the values"):
        _run_script(script)


def test_detects_a_crash_and_a_mutated_input(monkeypatch):
    program = KNOWN_BUG_SHAPES["alias-iadd"]

    def crashing(model, *args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(reparam_fx, "fuse", crashing)
    finding = fuzzing.check_capture(program, "export")
    assert finding.kind == "crash-fuse" and "planted" in finding.message
    script = fuzzing.reproducer(program, "export", fuzzing.capture_options(1, "export"), finding)
    with pytest.raises(RuntimeError, match="planted"):
        _run_script(script)

    monkeypatch.undo()
    fuse = reparam_fx.fuse

    def mutating(model, *args, **kwargs):
        fused = fuse(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        return fused

    monkeypatch.setattr(reparam_fx, "fuse", mutating)
    finding = fuzzing.check_capture(program, "fx")
    assert finding.kind == "mutated-input"


def test_detects_a_fuse_that_changes_what_the_model_computes(monkeypatch):
    fuse = reparam_fx.fuse

    def rerouting(model, *args, **kwargs):
        fused = fuse(model, *args, **kwargs)
        model.model[-1].f = [-1, -1]  # the caller's routing: its head reads layer 1 twice
        return fused

    monkeypatch.setattr(reparam_fx, "fuse", rerouting)
    finding = fuzzing.check_capture(WHOLE_PROGRAM, "fx", ())
    assert finding.kind == "mutated-input" and "after fuse" in finding.message
    script = fuzzing.reproducer(WHOLE_PROGRAM, "fx", (), finding)
    with pytest.raises(AssertionError, match="fuse changed what the model computes"):
        _run_script(script)


def test_detects_a_fused_whole_program_that_does_not_export(monkeypatch):
    fuse = reparam_fx.fuse

    def unexportable(model, *args, **kwargs):
        fused = fuse(model, *args, **kwargs)

        def refuse(module, inputs):
            if torch.compiler.is_exporting():
                raise RuntimeError("planted")
        fused.register_forward_pre_hook(refuse)
        return fused

    monkeypatch.setattr(reparam_fx, "fuse", unexportable)
    opts = options(export_fused=True)
    finding = fuzzing.check_capture(WHOLE_PROGRAM, "fx", opts)
    assert finding.kind == "crash-fused" and finding.error_type.startswith("export-fused")
    assert fuzzing.check_capture(KNOWN_BUG_SHAPES["alias-iadd"], "fx", opts) is None  # whole programs only
    script = fuzzing.reproducer(WHOLE_PROGRAM, "fx", opts, finding)
    assert "torch.export.export(fused" in script
    with pytest.raises(RuntimeError, match="planted"):
        _run_script(script)


@pytest.mark.parametrize("capture", fuzzing.CAPTURES)
def test_reproducers_run(capture):
    """A reproducer is a self-contained script; on a program that fuses correctly it runs
    to the end."""
    program = _program(Statement("conv", "v1", ("x",), "sequential-bn", CONV3),
                       Statement("identity", "v2", ("x",), "module"),
                       Statement("add", "v3", ("v1", "v2"), "plus"))
    opts = {"onnx": options(opset=17, constant_folding=True, dynamic=True, training=False),
            "export": options(dynamic=True), "core": options(dynamic=True)}.get(capture, ())
    assert fuzzing.check_capture(program, capture, opts) is None
    script = fuzzing.reproducer(program, capture, opts, None)
    assert "class Program(nn.Module)" in script and "import reparam_fx" in script
    output = _run_script(script)
    assert output.count("relative error") == 2  # both input sizes were compared


def test_shrinking_rewires_uses_of_a_deleted_statement():
    program = KNOWN_BUG_SHAPES["alias-iadd"]
    candidates = [p for p, _ in fuzzing.shrink_candidates(program, ())]
    for candidate in candidates:
        fuzzing.infer_types(candidate)  # every candidate names only defined tensors
    lengths = {len(c.statements) for c in candidates}
    assert len(program.statements) - 1 in lengths
