"""The layer base class and the structural layers: dense, combinators, normalization.

* :mod:`.base`: :class:`~.base.Layer` (the public base: ``init_fn``/``apply_fn``/``kernel_fn``,
  ``to_module``), :class:`~.base.StaxModule`, spatial adaptation between layers;
* :mod:`.dense`, :mod:`.combinators` (``serial``, ``parallel``, ``FanOut``, ``FanIn*``,
  ``Identity``), :mod:`.normalization` (``LayerNorm``);
* :mod:`.hyper`: hyper-parameters as tensors (for scikit-learn and GPyTorch).

May import: :mod:`infnets._src.core`, :mod:`infnets._src.evaluate`.
"""
