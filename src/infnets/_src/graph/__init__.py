"""Graph networks: aggregation of node features along a graph (GNTK).

* :mod:`.aggregate`: ``Aggregate`` (Du et al. 2019, "Graph neural tangent kernel"), node
  features ``(N, C, n_nodes)`` summed along dense or edge-list adjacency patterns.

May import: :mod:`infnets._src.core`, :mod:`infnets._src.evaluate`, :mod:`infnets._src.layers`.
"""
