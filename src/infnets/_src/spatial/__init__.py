"""Layers that act on positions: convolutions and pooling (channels-first ``(N, C, *spatial)``).

* :mod:`.conv`: ``Conv`` (window sums of covariances, Novak et al. 2019; Garriga-Alonso et al.
  2019) and the window geometry shared with pooling;
* :mod:`.pooling`: ``AvgPool``, ``SumPool``, ``GlobalAvgPool``, ``GlobalSumPool``, ``Flatten``.

May import: :mod:`infnets._src.core`, :mod:`infnets._src.evaluate`, :mod:`infnets._src.layers`.
"""
