"""A faster, leaner drop-in for :class:`~bnas_nni.search.mixed_cell.BinaryMixedCell`.

:class:`FastBinaryMixedCell` computes the same function as ``BinaryMixedCell`` (same modules, parameters,
buffers and state dict, same alphas shared per label, same export) but organises a search cell's work
around its *states* instead of its edges:

* **One normalisation and one sign per state.** Every binary op reading state ``s_j`` starts with a
  non-affine ``BatchNorm2d``. In training mode they all normalise with the same batch statistics, so
  ``sign(BN(s_j))`` is computed once and shared by every binary op on every edge leaving ``s_j`` (4 ops x up
  to 4 edges in the paper cell); BN and sign are fused (:class:`_BNSignSTE`) so that backward keeps a
  boolean ``|BN(s_j)| < 1`` mask instead of the float ``BN(s_j)``. Every BN module's running statistics are
  still updated as its own forward would (batch mean, unbiased variance, momentum or cumulative average,
  ``num_batches_tracked``), with a few ``_foreach`` ops on C-vectors. In eval mode BNs normalise with their
  own running statistics: BNs whose statistics are equal (always so when the supernet was trained as a
  whole from the common init) share one normalisation, BNs whose statistics differ get their own, so eval
  mode is exact too.
* **One conv per kernel type per state.** The binary convs of one kind (kernel, dilation, padding, stride)
  leaving a state run as one convolution over the concatenation, along output channels, of the ops'
  binarized weights. XNOR scales are per output filter, so binarizing the concatenated latent weights in
  one call equals binarizing each op's weights (binarizers with ``per_filter`` and no state; others go op by op).
* **One autograd node per state** (:class:`_StateBinaryOps`, the default path). BN, sign, every merged conv and
  every pool leaving a state run in one function; ops going to the same nodes are summed into one *bundle*
  output whose channel block ``e`` is the state's contribution to its ``e``-th destination node. On CPU the
  binary convolutions are exact int8 ternary convolutions (``sign(x)`` times ``sign(W)`` summed as integers by
  oneDNN, the per-filter XNOR scale applied once, with the softmax weight; see :mod:`.kernels`), about 3x
  cheaper than fp32; elsewhere, or for weights that are not per-filter-scaled signs, fp32 convs (a binarizer
  that declares ``WeightBinarizer.exact_ternary_signs`` is taken at its word; other binarizers' weights are
  checked). A reduction cell's dilated convs (stride = dilation = 2) run as the equivalent stride-1, undilated
  convs of the input subsampled by 2, which oneDNN computes about twice as fast in backward. Backward keeps a
  byte per element for the sign and the straight-through mask and the int8 convs' ``ReLU(conv)`` (exact integer
  sums, fp32), which the architecture step's softmax-weight gradient needs and whose ReLU backward is the
  cheapest mask in weight steps (fp32 convs keep a byte mask); pools are recomputed. The packed int8 weights are
  reused while the latent weights are unchanged (version counters), so a weight step reuses its architecture
  step's packing. The softmax-weight gradient of a conv comes from the adjoint identity
  ``sum g * ReLU(conv(s, W)) = sum W * dW`` when ``dW`` is computed anyway, else from the kept ``ReLU(conv)``:
  an architecture step (weights frozen) computes no weight-gradient convolution at all. (Folding ``p`` into the
  weights before the ReLU was tried and dropped: ties at 0 then round to +-1 ulp, which flips ReLU gradients.)
* **Fused elementwise passes.** On CPU in float32, the chains of elementwise ops around the convolutions run
  as single passes of a small C++ extension (:mod:`.kernels`, compiled once per machine): the sign and the
  straight-through mask of a state, the softmax-weighted sum of a bundle's convs and pools, each conv's ReLU
  backward together with the per-channel sums ``sum g * ReLU(conv)`` of the architecture gradient (in
  double precision), the pools' backward through their BN weights, the straight-through mask in backward.
  Where it cannot be built, and for other dtypes and devices, the same torch ops as before run instead.
* **Fallbacks.** ``BNAS_FAST_KERNELS=0``, eval mode with unequal BN statistics and activation quantizers
  other than ``ste_sign`` use the per-kernel-type path (:class:`_ConvReLUScale`, :class:`_BNWeighted`),
  which computes the same values with plain fp32 PyTorch ops. Node sums are accumulated as they come,
  never through ``torch.stack`` of all op outputs; the cell runs channels-last on CPU and returns its
  output in its caller's layout.
* **Zeroise costs nothing.** Its output is zero, so it is skipped; its logit still takes softmax mass and
  still gets its gradient through the softmax.

Ops the fast path does not recognise (custom ops, affine BNs, ...) run as in ``BinaryMixedCell`` and are
added with their softmax weight, so any op set works. Double backward is not supported (first-order
search only).

Use it as a mutation hook, ``FastBinaryMixedCell.mutate``, in place of ``BinaryMixedCell.mutate``.
Measured with ``bench/search_step.py`` and ``bench/search_epoch.py``; tested against ``BinaryMixedCell``
in ``tests/test_fast_cell.py`` and ``tests/test_fast_kernels.py``.

The package, by concern (each module imports only those above it):

* :mod:`.kernels` -- the exact int8 ternary convolution and the fused elementwise passes (C++ in ``csrc/``);
* :mod:`.bn_emulation` -- one normalisation per state, every BN module's running statistics kept as its own;
* :mod:`.plan` -- which ops run together: per-state plans, merged convs, bundles, conv and pool specs;
* :mod:`.functions` -- the autograd functions, chiefly :class:`_StateBinaryOps` (a state in one node);
* :mod:`.module` -- :class:`FastBinaryMixedCell`, the ``nn.Module`` that runs the plans.
"""
from __future__ import annotations

# internals that tests reach for by their old module-level names (``fast_cell._StateBinaryOps``, ...)
from .bn_emulation import _BNGroup as _BNGroup
from .functions import _ConvReLUScale as _ConvReLUScale
from .functions import _phases as _phases
from .functions import _StateBinaryOps as _StateBinaryOps
from .functions import _subsample as _subsample
from .module import FastBinaryMixedCell

__all__ = ['FastBinaryMixedCell']
