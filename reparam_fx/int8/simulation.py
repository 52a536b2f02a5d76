"""The int8 policy's measurement: calibration inputs run through the float graph, and
each candidate form of a conv simulated in int8 on the conv's recorded inputs.

The simulation follows what XNNPACK's quantizer makes: activations per tensor, affine,
their range from the calibration (min/max); weights per output channel, symmetric; the
conv's output quantized, and for a kept-apart identity the multiply's output and the
add's output quantized too. Its result is the drop of the conv's output error (dB)
against the merged conv, on the recorded inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from reparam_fx.core.quantization import extract_identity
from reparam_fx.int8.graph import LinearSite, graph_uses, linear_site

aten = torch.ops.aten


@dataclass
class Recorded:
    inputs: list  # a few inputs of the conv (float)
    low: float  # the input's range over the calibration
    high: float
    out_low: float  # the output's range
    out_high: float
    numel_out: int  # per sample
    macs: int  # per sample


def record_conv_inputs(gm: torch.fx.GraphModule, inputs: list, keep: int = 2) -> dict:
    """Run the float graph on the calibration inputs; per rewritable conv/linear node, its
    input's and output's ranges, its first ``keep`` inputs, and its size per sample."""
    uses = graph_uses(gm)
    sites = {node: site for node in gm.graph.nodes
             if (site := linear_site(gm, node, uses)) is not None}
    seen: dict = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            site = sites.get(n)
            x = self.env.get(site.input) if site is not None else None
            if isinstance(result, torch.Tensor) and isinstance(x, torch.Tensor) and \
                    x.is_floating_point():
                item = seen.get(n)
                if item is None:
                    weight, _ = site.get()
                    numel = result[0].numel()
                    item = seen[n] = Recorded([], math.inf, -math.inf, math.inf, -math.inf,
                                              numel, numel * math.prod(weight.shape[1:]))
                if len(item.inputs) < keep:
                    item.inputs.append(x.detach())
                item.low = min(item.low, float(x.min()))
                item.high = max(item.high, float(x.max()))
                item.out_low = min(item.out_low, float(result.min()))
                item.out_high = max(item.out_high, float(result.max()))
            return result

    with torch.no_grad():
        for args in inputs:
            Recorder(gm).run(*args)
    return seen


def _fake_quant(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Per-tensor affine int8 (as XNNPACK's activations), range including 0."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-12) / 255
    zero = round(-128 - low / scale)
    return (torch.clamp(torch.round(x / scale) + zero, -128, 127) - zero) * scale


def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric int8 (as XNNPACK's weights)."""
    scale = w.flatten(1).abs().amax(1).clamp_min(1e-12) / 127
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w / scale.view(shape)), -127, 127) * scale.view(shape)


def measured_gain_db(site: LinearSite, delta, item: Recorded) -> float:
    """10 log10 of the conv's local int8 error merged over apart, on recorded inputs."""
    weight, bias = site.get()
    node = site.node
    w = weight.detach().double()
    b = None if bias is None else bias.detach().double()
    w_apart = extract_identity(w, site.groups, delta)
    conv = _conv_call(site, node)
    merged_err = apart_err = 0.0
    for x in item.inputs:
        x = x.double()
        exact = conv(x, w, b)
        xq = _fake_quant(x, item.low, item.high)
        merged = _fake_quant(conv(xq, _fake_quant_weight(w), b), item.out_low, item.out_high)
        partial = conv(xq, _fake_quant_weight(w_apart), b)
        partial_range = (float(partial.min()), float(partial.max()))
        identity = delta * xq if not isinstance(delta, torch.Tensor) else \
            _fake_quant(delta.view((-1,) + (1,) * (x.dim() - 2)) * xq, *_range(delta, xq))
        apart = _fake_quant(_fake_quant(partial, *partial_range) + identity,
                            item.out_low, item.out_high)
        merged_err += float((merged - exact).pow(2).sum())
        apart_err += float((apart - exact).pow(2).sum())
    return 10 * math.log10(max(merged_err, 1e-300) / max(apart_err, 1e-300))


def _range(delta: torch.Tensor, xq: torch.Tensor) -> tuple[float, float]:
    scaled = delta.view((-1,) + (1,) * (xq.dim() - 2)) * xq
    return float(scaled.min()), float(scaled.max())


def _conv_call(site: LinearSite, node: torch.fx.Node):
    """``(x, w, b) -> conv`` with the node's geometry."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return lambda x, w, b: _functional_conv(x, w, b, module.stride, module.padding,
                                                module.dilation, module.groups)
    if node.target is aten.convolution.default:
        _, _, _, stride, padding, dilation, _, _, groups = node.args
    else:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, node.args)) | dict(node.kwargs)
        stride, padding, dilation = bound.get("stride", 1), bound.get("padding", 0), \
            bound.get("dilation", 1)
        groups = bound.get("groups", 1)
    return lambda x, w, b: _functional_conv(x, w, b, stride, padding, dilation, groups)


def _functional_conv(x, w, b, stride, padding, dilation, groups):
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return conv(x, w, b, stride, padding, dilation, groups)
