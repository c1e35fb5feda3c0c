"""Graph classification with the graph neural tangent kernel (Du et al. 2019).

A small synthetic task: graphs of 10 nodes are either two dense communities joined by
one edge (class 1) or one random graph with the same expected number of edges (class 0).
Node features are the node degree and a constant. The GNTK of a two-layer graph network
(per-node MLP, sum aggregation with self-loops, sum readout) is used for kernel
regression (``infnets.predict.gp_inference``, the infinite ensemble of trained networks)
and the sign of the prediction is the class.

Run: ``python examples/graph_classification.py``.
"""

from __future__ import annotations

import torch

from infnets import predict, stax


def make_graphs(n: int, nodes: int = 10, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(x, adjacency, labels)``: features ``(n, 2, nodes)``, ``(n, nodes, nodes)``, ``(n,)``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    half = nodes // 2
    block = torch.zeros(nodes, nodes, dtype=torch.bool)
    block[:half, :half] = block[half:, half:] = True
    p_in = 0.9
    # the same expected number of edges for both classes
    p_flat = p_in * (2 * half * (half - 1) / 2) / (nodes * (nodes - 1) / 2)
    u = torch.rand(n, nodes, nodes, generator=g)
    prob = torch.where(labels[:, None, None].bool(), block * p_in, torch.full_like(u, p_flat))
    adj = torch.triu(u < prob, 1)
    adj[labels.bool(), 0, half] = True  # the bridge between the two communities
    adj = adj | adj.transpose(1, 2)
    degree = adj.sum(-1).to(torch.float64)
    x = torch.stack([degree / degree.mean(), torch.ones_like(degree)], dim=1)
    adj = adj.to(torch.float64) + torch.eye(nodes, dtype=torch.float64)  # self-loops
    return x, adj, labels


def gntk() -> stax.Serial:
    """Two GNN layers: per-node MLP (Conv over 1 node), ReLU, sum over neighbours."""
    block = stax.serial(stax.Conv(512, (1,), W_std=1.4, b_std=0.1), stax.Relu(), stax.Aggregate())
    return stax.serial(block, block, stax.GlobalSumPool(), stax.Dense(1, W_std=1.0))


def main(n_train: int = 80, n_test: int = 80, seed: int = 0) -> float:
    """Train on ``n_train`` graphs, return the accuracy on ``n_test`` new ones."""
    x, adj, y = make_graphs(n_train + n_test, seed=seed)
    xtr, xte, atr, ate = x[:n_train], x[n_train:], adj[:n_train], adj[n_train:]
    targets = (2.0 * y[:n_train] - 1.0)[:, None].to(torch.float64)
    kernel_fn = gntk().kernel_fn
    k_train = kernel_fn(xtr, None, "ntk", pattern=(atr, None))
    k_test = kernel_fn(xte, xtr, "ntk", pattern=(ate, atr))
    scale = k_train.diagonal().mean()
    predict_fn = predict.gp_inference(k_train / scale, targets, diag_reg=1e-3)
    mean = predict_fn("ntk", k_test / scale)
    accuracy = float(((mean[:, 0] > 0).long() == y[n_train:]).double().mean())
    print(f"GNTK kernel regression on {n_train} graphs, test accuracy: {accuracy:.2f}")
    return accuracy


if __name__ == "__main__":
    main()
