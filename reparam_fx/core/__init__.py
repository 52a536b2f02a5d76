"""What both frontends share, in the order the data flows.

* :mod:`.terms` - the two kinds of affine term (per-channel affine, conv) and their
  constructors; :mod:`.affine` - the algebra: ``compose`` and ``merge``, exact or
  :class:`~reparam_fx.core.affine.NotExact` with a reason. Pure tensor math.
* :mod:`.layout` - channel axes through moves (reshapes, permutes, averages).
* :mod:`.regions` - what one op computes (``Unary``, ``Sum``, ``Refused``) and the regions
  ops collapse into; :mod:`.builder` - the walk that builds them over a frontend's view;
  :mod:`.selection` - which regions to write, downstream first.
* :mod:`.pipeline` - passes to a fixpoint, one pass's regions, the report's lines.
* :mod:`.report` - :class:`~reparam_fx.core.report.FusionReport` (data).
* :mod:`.verification` - float64 equivalence of a model and its fused form.
* :mod:`.text` - errors as one line.

No module here imports torch.fx, onnx or a frontend.
"""
