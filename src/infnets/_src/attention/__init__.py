"""Self-attention in the infinite-width limit (Hron, Bahri, Sohl-Dickstein & Novak 2020).

* :mod:`.layer`: ``GlobalSelfAttention``: arguments, finite twin, positional embeddings;
* :mod:`.kernel`: the exact NNGP/NTK maps (linear scaling; identity attention);
* :mod:`.qmc`: standard (``1/sqrt(d)``) attention by quasi-Monte Carlo over Gaussian logits.

May import: :mod:`infnets._src.core`, :mod:`infnets._src.evaluate`, :mod:`infnets._src.layers`,
:mod:`infnets._src.spatial`, :mod:`infnets._src.elementwise`.
"""
