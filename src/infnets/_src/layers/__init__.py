"""The layer base class and the structural layers: dense, combinators, normalization.

* :mod:`.base`: :class:`~.base.Layer` (the public base: ``init_fn``/``apply_fn``/``kernel_fn``,
  ``to_module``), :class:`~.base.StaxModule`, spatial adaptation between layers;
* :mod:`.dense`, :mod:`.combinators` (``serial``, ``parallel``, ``FanOut``, ``FanIn*``,
  ``Identity``), :mod:`.normalization` (``LayerNorm``);
* :mod:`.hyper`: hyper-parameters as tensors (for scikit-learn and GPyTorch);
* :mod:`.index` (``Index``, ``Slice``), :mod:`.dot_general` (``DotGeneral``), :mod:`.repeat`
  (``repeat``), :mod:`.frozen` (``Frozen``), :mod:`.side_inputs` (per-call ``pattern=``).

May import: :mod:`infnets._src.core`, :mod:`infnets._src.evaluate`.
"""
