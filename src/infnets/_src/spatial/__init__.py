"""Layers that act on positions: convolutions and pooling (channels-first ``(N, C, *spatial)``).

* :mod:`.conv`: ``Conv`` (window sums of covariances, Novak et al. 2019; Garriga-Alonso et al.
  2019) and the window geometry shared with pooling;
* :mod:`.pooling`: ``AvgPool``, ``SumPool``, ``GlobalAvgPool``, ``GlobalSumPool``, ``Flatten``;
* :mod:`.conv_transpose` (``ConvTranspose``), :mod:`.local` (``ConvLocal``), :mod:`.resize`
  (``ImageResize``), and :mod:`.axis_maps`: fixed linear maps of positions on covariances.

May import: :mod:`infnets._src.core`, :mod:`infnets._src.evaluate`, :mod:`infnets._src.layers`.
"""
