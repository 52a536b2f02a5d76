"""Property-test your own re-parameterizable blocks against :func:`reparam_fx.fuse`.

Three things live here, all public:

1. **Randomisers.** A freshly initialised BatchNorm is the identity map and a freshly
   initialised layer scale is ~0, which hides folding bugs. Randomise them first::

       model = MyBlock().eval()
       randomize_batchnorm_(model, seed=0)       # mean ~ N(0,1), var ~ U(0.5,2),
                                                 # gamma ~ +-U(0.5,1.5), beta ~ N(0,1)
       randomize_parameters_(model, seed=0)      # every "layer_scale" / "gamma" parameter

2. **A checker.** :func:`assert_fuses_exactly` fuses a float64 copy, compares outputs,
   optionally checks the op histogram of the result and that nothing was mutated::

       fused = assert_fuses_exactly(model, (x,), expect_ops={"conv": 1, "batch_norm": 0})

3. **Block descriptions, an oracle and hypothesis strategies.** :class:`BlockSpec` describes
   a multi-branch block over one input (RepVGG, MobileOne, ACNet, RepMixer, CPE, ...);
   ``spec.build()`` makes it, and ``spec.expected_ops()`` says — independently of the
   engine — what the fused block must contain. :func:`block_specs`,
   :func:`linear_head_specs` and :func:`small_graphs` generate them::

       from hypothesis import given, settings
       from reparam_fx.testing import assert_fuses_exactly, block_specs

       @settings(deadline=None)  # the first fuse of a process is slow (imports, warm-up)
       @given(block_specs(dims=(2,), max_channels=8))
       def test_blocks_fuse(spec):
           model = spec.build(seed=0)
           assert_fuses_exactly(model, (spec.example_input(),), expect_ops=spec.expected_ops())

   Hand-written specs work too::

       repvgg = BlockSpec(dims=2, in_channels=4, out_channels=4, branches=(
           BranchSpec.conv(3, bn=True), BranchSpec.conv(1, bn=True), BranchSpec.batchnorm()))
       assert repvgg.merges and repvgg.expected_convs() == 1

The oracle's merge rule
-----------------------
A sum of terms over one input merges into one conv iff

(a) every conv term has ``padding_mode='zeros'``;
(b) all terms have the same stride (identity / BN-only = 1x1 kernel, stride 1, padding 0);
(c) all terms have the same centre offset per spatial dim, ``c = p - d*(k - 1)/2``;
(d) all terms have the same output channels (identity: ``in_channels``);
(e) no term contains a nonlinearity;
(f) the MAC gate (sums of identities and BN-only branches alone are a per-channel affine
    and always merge): per dim, ``D`` = gcd of the dilations of terms whose kernel > 1 there
    (1 if none), ``P`` = max padding; every term's taps lie on the merged lattice
    (``(P - p_i) % D == 0``); merged kernel ``K = 2*(P - c)/D + 1``; merged groups
    ``g`` = gcd of the conv terms' groups; then ``C_out*(C_in/g)*prod(K)`` must not exceed
    ``sum_i C_out*(C_in/g_i)*prod(k_i)`` over the conv terms.

A single linear term is a chain and always folds whatever follows it (BN, layer scale),
whatever its padding mode. A conv folds its own BN even when its sum does not merge; a BN
or layer scale after a sum that does not merge stays.

The rule applies to the whole sum: add/sub chains are flattened, so branch order does
not matter. When the whole sum does not merge, the branches are partitioned into
mergeable groups; each group that holds a conv becomes one conv and the sum of the rest
stays (:meth:`BlockSpec.merged_groups`).

Requires ``hypothesis`` (``pip install reparam-fx[test]``).

The package: :mod:`.checks` (randomisers, the checker), :mod:`.blocks` (multi-branch block
specs and their oracle), :mod:`.graphs` (linear heads, small random graphs),
:mod:`.strategies` (hypothesis strategies drawing the specs).
"""

import importlib.util

if importlib.util.find_spec("hypothesis") is None:  # pragma: no cover
    raise ImportError("reparam_fx.testing needs hypothesis: pip install 'reparam-fx[test]'")

from reparam_fx.testing.blocks import BlockSpec, BranchSpec, MultiBranchBlock
from reparam_fx.testing.checks import (assert_fuses_exactly, changed_entries, conv_batchnorm_pairs,
                                       count_macs, randomize_batchnorm_, randomize_parameters_)
from reparam_fx.testing.graphs import (GraphOp, GraphSpec, HeadSpec, LinearHeads, LinearHeadSpec,
                                       SmallGraph)
from reparam_fx.testing.strategies import block_specs, linear_head_specs, small_graphs

__all__ = [
    "randomize_batchnorm_", "randomize_parameters_", "assert_fuses_exactly",
    "count_macs", "conv_batchnorm_pairs", "changed_entries",
    "BranchSpec", "BlockSpec", "MultiBranchBlock",
    "HeadSpec", "LinearHeadSpec", "LinearHeads",
    "GraphOp", "GraphSpec", "SmallGraph",
    "block_specs", "linear_head_specs", "small_graphs",
]
