"""Graph aggregation (``stax.Aggregate``): Monte Carlo, dense = sparse, oracles, bad inputs.

Monte Carlo as in ``tests/helpers.py``: ``S`` independent finite graph networks (256
channels per node, float64), NNGP from 512 i.i.d. readout units, NTK from the Jacobian
of one readout unit; ``|mean - analytic| <= 5 SE + bias``. One hidden per-node layer
before the first aggregation is exactly Gaussian (``bias = 0``); the second hidden layer
gets the O(1/width) allowance ``8 / 256``.
"""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import pytest
import torch

from helpers import assert_mc_agrees, empirical_ntk
from infnets import stax

F64 = torch.float64
C = 256
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _graphs(n: int, nodes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random graphs with self-loops: features, dense adjacency, padded edge lists."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, nodes, generator=g, dtype=F64)
    upper = torch.rand(n, nodes, nodes, generator=g) < 0.4
    adj = torch.triu(upper, 1)
    adj = (adj | adj.transpose(1, 2) | torch.eye(nodes, dtype=torch.bool)).to(F64)
    edges = torch.full((n, nodes * nodes, 2), -1, dtype=torch.long)
    for b in range(n):  # building test data, not library code
        ij = adj[b].nonzero()
        edges[b, : len(ij)] = ij
    return x, adj, edges


def _net(par: str = "ntk", implementation: str = "DENSE", width: int = C) -> stax.Serial:
    return stax.serial(
        stax.Conv(width, (1,), W_std=1.3, b_std=0.1, parameterization=par),
        stax.Relu(),
        stax.Aggregate(implementation=implementation),
        stax.Conv(width, (1,), W_std=1.1, b_std=0.2, parameterization=par),
        stax.Erf(),
        stax.Aggregate(implementation=implementation),
        stax.GlobalSumPool(),
    )


@pytest.mark.parametrize("par", ["ntk", "standard"])
def test_monte_carlo_graph_network(par):
    x, adj, _ = _graphs(3, 5, seed=1)
    net = stax.serial(_net(par), stax.Dense(512, 1.0, 0.1, par))
    gen = torch.Generator().manual_seed(2)
    ks, ts = [], []
    for _ in range(40):  # the NTK of two aggregations scatters more: 40 keep SE < 4%
        _, p = net.init_fn(gen, tuple(x.shape), dtype=F64)
        y = net.apply_fn(p, x, pattern=adj)
        ks.append(y @ y.T / 512)
        ts.append(empirical_ntk(lambda q, v: net.apply_fn(q, v, pattern=adj), p, x))
    k = net.kernel_fn(x, None, ("nngp", "ntk"), pattern=(adj, None))
    for name, est, exact in (("NNGP", ks, k.nngp), ("NTK", ts, k.ntk)):
        s = torch.stack(est)
        assert_mc_agrees(s.mean(0), s.std(0) / math.sqrt(len(est)), exact, 8.0 / C, name)


def test_dense_and_sparse_patterns_agree():
    x, adj, edges = _graphs(4, 6, seed=3)
    x2, adj2, edges2 = _graphs(3, 6, seed=4)
    dense, sparse = _net(width=5), _net(implementation="SPARSE", width=5)
    kd = dense.kernel_fn(x, x2, ("nngp", "ntk"), pattern=(adj, adj2))
    ks = sparse.kernel_fn(x, x2, ("nngp", "ntk"), pattern=(edges, edges2))
    torch.testing.assert_close(kd.nngp, ks.nngp)
    torch.testing.assert_close(kd.ntk, ks.ntk)
    _, p = dense.init_fn(0, tuple(x.shape), dtype=F64)
    torch.testing.assert_close(
        dense.apply_fn(p, x, pattern=adj), sparse.apply_fn(p, x, pattern=edges)
    )
    m = dense.to_module(tuple(x.shape), dtype=F64)
    torch.testing.assert_close(m(x, pattern=adj), dense.apply_fn(m.stax_params, x, pattern=adj))


def test_aggregation_of_raw_features_is_kernel_of_aggregated_features():
    """A x is a finite map of x: the kernel of aggregated raw inputs is the raw kernel of
    the aggregated inputs (also the packed layout of >= 16 graphs, and x2)."""
    x, adj, _ = _graphs(18, 4, seed=5)
    tail = [stax.Conv(4, (1,), b_std=0.1), stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1)]
    net = stax.serial(stax.Aggregate(), *tail)
    ax = torch.einsum("bij,bcj->bci", adj, x)
    direct = stax.serial(*tail)
    for x2, p2, ax2 in ((None, None, None), (x[:5], adj[:5], ax[:5])):
        k = net.kernel_fn(x, x2, ("nngp", "ntk"), pattern=(adj, p2))
        ref = direct.kernel_fn(ax, ax2, ("nngp", "ntk"))
        torch.testing.assert_close(k.nngp, ref.nngp)
        torch.testing.assert_close(k.ntk, ref.ntk)


def test_identity_pattern_changes_nothing():
    x, _, _ = _graphs(3, 4, seed=6)
    eye = torch.eye(4, dtype=F64).expand(3, 4, 4)
    body = [stax.Conv(4, (1,)), stax.Relu(), stax.GlobalSumPool()]
    a = stax.serial(body[0], stax.Aggregate(), *body[1:]).kernel_fn(
        x, None, "ntk", pattern=(eye, None)
    )
    torch.testing.assert_close(a, stax.serial(*body).kernel_fn(x, None, "ntk"))


def test_bad_patterns():
    x, adj, edges = _graphs(3, 4, seed=7)
    net = stax.serial(stax.Aggregate(), stax.GlobalSumPool())
    with pytest.raises(ValueError, match="needs the graphs' adjacency"):
        net.kernel_fn(x, None, "nngp")
    with pytest.raises(ValueError, match=r"pattern=\(pattern1, pattern2\)"):
        net.kernel_fn(x, None, "nngp", pattern=adj)
    with pytest.raises(ValueError, match=r"need \(3, 4, 4\)"):
        net.kernel_fn(x, None, "nngp", pattern=(adj[:2], None))
    with pytest.raises(ValueError, match="edge list"):
        stax.Aggregate(implementation="SPARSE").apply_fn((), x, pattern=adj)
    with pytest.raises(ValueError, match="names a node"):
        stax.Aggregate(implementation="SPARSE").apply_fn((), x, pattern=edges + 4)
    with pytest.raises(ValueError, match="partial aggregation"):
        stax.Aggregate(aggregate_axis=2).apply_fn((), x[:, :, :, None].expand(3, 3, 4, 2))
    with pytest.raises(ValueError, match="node features"):
        stax.Aggregate().init_fn(0, (-1, 3))
    with pytest.raises(TypeError, match="unexpected keyword"):
        net.apply_fn((), x, adjacency=adj)


def test_graph_classification_example_runs():
    out = runpy.run_path(str(ROOT / "examples" / "graph_classification.py"), run_name="example")
    assert out["main"](n_train=40, n_test=40, seed=0) >= 0.8
