"""infnets.distributed: tiled and Dask kernel matrices, the resumable store, solvers at scale."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from infnets import stax

pytest.importorskip("dask.array", reason="the distributed extra (dask) is not installed")
pytest.importorskip("distributed", reason="the distributed extra (dask.distributed) is missing")
pytest.importorskip("zarr", reason="the distributed extra (zarr) is not installed")

import dask  # noqa: E402

from infnets import distributed as dist  # noqa: E402

NET = stax.serial(
    stax.Dense(64, W_std=1.4, b_std=0.1),
    stax.Relu(),
    stax.Dense(32, W_std=1.3),
    stax.Erf(),
    stax.Dense(1, W_std=1.2, b_std=0.05),
)


def _x(n: int, d: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def client():  # type: ignore[no-untyped-def]
    """Two single-threaded in-process workers (tcp, so a second Client can connect)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        protocol="tcp://",
        dashboard_address=":0",
    )
    c = Client(cluster, set_as_default=False)
    yield c
    c.close()
    cluster.close()


def _assert_kernels(got: dict[str, np.ndarray], ref: Any) -> None:
    for name, value in got.items():
        want = getattr(ref, name).numpy()
        assert value.shape == want.shape
        np.testing.assert_allclose(value, want, rtol=1e-10, atol=1e-12, err_msg=name)


# ------------------------------------------------------------------ the grid
def test_tile_grid_uneven_and_symmetric() -> None:
    g = dist.TileGrid(10, 7, 4, symmetric=False)
    assert g.shape == (3, 2) and g.chunks == ((4, 4, 2), (4, 3))
    assert len(g.tiles()) == 6 and g.blocks(2, 1) == [(2, 1)]
    s = dist.TileGrid(10, 10, 4, symmetric=True)
    assert s.tiles() == [(0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2)]
    assert s.blocks(0, 2) == [(0, 2), (2, 0)] and s.blocks(1, 1) == [(1, 1)]
    with pytest.raises(ValueError):
        dist.TileGrid(3, 4, 2, symmetric=True)


# ------------------------------------------------------------ lazy Dask arrays
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("where", ["threads", "cluster"])
def test_kernel_matrix_equals_kernel_fn(symmetric: bool, where: str, client) -> None:  # type: ignore[no-untyped-def]
    x1, x2 = _x(23), (None if symmetric else _x(10, seed=1))
    ref = NET.kernel_fn(x1, x2, ("nngp", "ntk"))
    k = dist.kernel_matrix(
        NET, x1, x2, ("nngp", "ntk"), tile=7, client="threads" if where == "threads" else client
    )
    assert k.nngp.chunks == ((7, 7, 7, 2), (7, 7, 7, 2) if symmetric else (7, 3))
    if where == "threads":
        nngp, ntk = dask.compute(k.nngp, k.ntk, scheduler="threads")
    else:
        nngp, ntk = client.compute([k.nngp, k.ntk], sync=True)
    _assert_kernels({"nngp": nngp, "ntk": ntk}, ref)
    if symmetric:
        np.testing.assert_array_equal(ntk, ntk.T)  # mirrored tiles: exactly symmetric
    single = dist.kernel_matrix(NET.kernel_fn, x1, x2, "nngp", tile=7, client="threads")
    np.testing.assert_array_equal(single.compute(scheduler="threads"), nngp)


def test_kernel_matrix_composes_with_dask_inputs_and_linear_algebra() -> None:
    import dask.array as da

    x = _x(30)
    xd = da.from_array(x.numpy(), chunks=(11, 5))
    k = dist.kernel_matrix(NET, xd, None, "nngp", tile=8, client="threads")
    v = np.linspace(-1, 1, 30)
    got = (k @ v).compute(scheduler="threads")
    want = NET.kernel_fn(x, None, "nngp").numpy() @ v
    np.testing.assert_allclose(got, want, rtol=1e-10)
    with pytest.raises(ValueError, match="nngp' and/or 'ntk"):
        dist.kernel_matrix(NET, x, None, "cov1", client="threads")


def test_kernel_matrix_scatters_inputs_no_large_graph(client) -> None:  # type: ignore[no-untyped-def]
    """20,000 x 100 float64 inputs (16 MB, over Dask's 10 MB large-graph threshold) travel
    to the workers once by scatter, not inside the graph; results are unchanged."""
    import warnings

    import dask.array as da

    x1, x2 = _x(20_000, 100, seed=3), _x(4, 100, seed=4)
    with warnings.catch_warnings(record=True) as caught:  # control: embedding does warn
        warnings.simplefilter("always")
        client.compute(da.from_array(x1.numpy(), chunks=(20_000, 100)).sum(), sync=True)
    if not any("large graph" in str(w.message) for w in caught):
        pytest.skip("this version of distributed does not warn about large graphs")
    k = dist.kernel_matrix(NET, x1, x2, ("nngp", "ntk"), tile=20_000, client=client)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        nngp, ntk = client.compute([k.nngp, k.ntk], sync=True)
    assert not [w for w in caught if "large graph" in str(w.message)]
    _assert_kernels({"nngp": nngp, "ntk": ntk}, NET.kernel_fn(x1, x2, ("nngp", "ntk")))
    # the symmetric problem on scattered inputs (small tiles) agrees with kernel_fn too
    xs = _x(23, 100, seed=5)
    sym = dist.kernel_matrix(NET, xs, None, "ntk", tile=7, client=client)
    got = client.compute(sym, sync=True)
    np.testing.assert_allclose(got, NET.kernel_fn(xs, None, "ntk").numpy(), rtol=1e-10)
    np.testing.assert_array_equal(got, got.T)


def test_multi_device_kernel_and_all_paths_agree_bitwise(tmp_path: Path) -> None:
    x1 = _x(17)
    m = dist.multi_device_kernel(NET, x1, None, ("nngp", "ntk"), tile=5)
    lazy = dist.kernel_matrix(NET, x1, None, "ntk", tile=5, client="threads")
    ks = dist.compute_kernel(
        NET, x1, None, "ntk", store=tmp_path / "K.zarr", tile=5, client="threads"
    )
    np.testing.assert_array_equal(m.ntk.numpy(), lazy.compute(scheduler="threads"))
    np.testing.assert_array_equal(m.ntk.numpy(), ks.to_numpy("ntk"))
    two = dist.multi_device_kernel(NET, x1, None, "ntk", tile=5, devices=["cpu", "cpu"])
    np.testing.assert_array_equal(two.numpy(), m.ntk.numpy())  # one thread per device
    _assert_kernels({"nngp": m.nngp.numpy()}, NET.kernel_fn(x1, None, ("nngp",)))


def _conv_net() -> Any:
    if not hasattr(stax, "Conv"):
        pytest.skip("stax.Conv does not exist yet (convolutions are being added)")
    head = getattr(stax, "Flatten", None) or getattr(stax, "GlobalAvgPool", None)
    if head is None:
        pytest.skip("neither stax.Flatten nor stax.GlobalAvgPool exists yet")
    return stax.serial(
        stax.Conv(4, (3, 3), padding="SAME", W_std=1.5, b_std=0.1),
        stax.Relu(),
        head(),
        stax.Dense(1),
    )


@pytest.mark.parametrize("symmetric", [True, False])
def test_convolutional_tiles(symmetric: bool, tmp_path: Path) -> None:
    net = _conv_net()
    g = torch.Generator().manual_seed(3)
    x1 = torch.randn(7, 2, 4, 4, generator=g, dtype=torch.float64)  # (N, C, H, W)
    x2 = None if symmetric else torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    ref = net.kernel_fn(x1, x2, ("nngp", "ntk"))
    k = dist.kernel_matrix(net, x1, x2, ("nngp", "ntk"), tile=3, client="threads")
    nngp, ntk = dask.compute(k.nngp, k.ntk, scheduler="threads")
    _assert_kernels({"nngp": nngp, "ntk": ntk}, ref)
    ks = dist.compute_kernel(
        net, x1, x2, ("nngp", "ntk"), store=tmp_path / "K.zarr", tile=3, client="threads"
    )
    np.testing.assert_array_equal(ks.to_numpy("ntk"), ntk)


# ------------------------------------------------------------------ the store
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("where", ["threads", "cluster"])
def test_compute_kernel_store(symmetric: bool, where: str, client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x1, x2 = _x(19), (None if symmetric else _x(9, seed=2))
    path = tmp_path / "K.zarr"
    ks = dist.compute_kernel(
        NET,
        x1,
        x2,
        ("nngp", "ntk"),
        store=path,
        tile=6,
        client="threads" if where == "threads" else client,
    )
    n_tiles = 10 if symmetric else 8
    assert ks.last_run is not None and len(ks.last_run.computed) == n_tiles
    assert ks.is_complete() and ks.names == ("nngp", "ntk")
    _assert_kernels({n: ks.to_numpy(n) for n in ks.names}, NET.kernel_fn(x1, x2, ("nngp", "ntk")))
    assert ks.to_dask("ntk").chunks[0] == (6, 6, 6, 1)
    again = dist.compute_kernel(NET, x1, x2, ("ntk", "nngp"), store=path, tile=6, client="threads")
    assert again.last_run is not None
    assert again.last_run.computed == () and again.last_run.reused == n_tiles
    runs = dist.open_kernel_store(path).runs()
    assert [len(r["computed"]) for r in runs] == [n_tiles, 0]


def test_store_refuses_other_computations(tmp_path: Path) -> None:
    x = _x(12)
    path = tmp_path / "K.zarr"
    dist.compute_kernel(NET, x, None, ("nngp", "ntk"), store=path, tile=5, client="threads")
    other = stax.serial(stax.Dense(64, W_std=1.5, b_std=0.1), stax.Relu(), stax.Dense(1))
    cases = [
        dict(kernel_fn=other, x1=x),
        dict(kernel_fn=NET, x1=x + 1e-12),
        dict(kernel_fn=NET, x1=x.float()),
        dict(kernel_fn=NET, x1=x, x2=x),
        dict(kernel_fn=NET, x1=x, tile=4),
        dict(kernel_fn=NET, x1=x, get="ntk"),
    ]
    whats = ["architecture", "x1", "dtype", "x2", "tile size", "kernels"]
    for case, what in zip(cases, whats):
        kw: dict[str, Any] = dict(get=("nngp", "ntk"), store=path, tile=5, client="threads")
        kw.update(case)
        with pytest.raises(dist.StoreMismatchError, match=what):
            dist.compute_kernel(**kw)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("not a store")
    with pytest.raises(FileExistsError, match="not an infnets kernel store"):
        dist.compute_kernel(NET, x, None, "ntk", store=tmp_path / "other", client="threads")
    with pytest.raises(TypeError, match="arch_id"):
        dist.compute_kernel(
            lambda a, b, g: None, x, None, "ntk", store=tmp_path / "f", client="threads"
        )


def _chunk_files(path: Path, name: str) -> list[Path]:
    meta = {"zarr.json", ".zarray", ".zattrs"}
    return sorted(p for p in (path / name).rglob("*") if p.is_file() and p.name not in meta)


@pytest.mark.parametrize(
    "damage", ["truncate", "garbage", "delete_chunk", "torn_marker", "lost_marker"]
)
def test_damaged_tiles_are_recomputed(damage: str, tmp_path: Path) -> None:
    x = _x(14)
    path = tmp_path / "K.zarr"
    ks = dist.compute_kernel(NET, x, None, ("nngp", "ntk"), store=path, tile=5, client="threads")
    want = {n: ks.to_numpy(n) for n in ks.names}
    markers = sorted((path / ".infnets" / "tiles").glob("*.json"))
    assert len(markers) == 6
    chunk = _chunk_files(path, "ntk")[1]
    if damage == "truncate":
        chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    elif damage == "garbage":
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    elif damage == "delete_chunk":
        chunk.unlink()
    elif damage == "torn_marker":
        markers[2].write_text(markers[2].read_text()[:20])
    else:  # crash between the chunk write and the marker
        markers[2].unlink()
    again = dist.compute_kernel(NET, x, None, ("nngp", "ntk"), store=path, tile=5, client="threads")
    assert again.last_run is not None
    n_bad = len(again.last_run.corrupt) + len(again.last_run.computed)
    assert 1 <= len(again.last_run.computed) <= 2 and n_bad <= 4
    assert again.verify() == []
    for n in ks.names:
        np.testing.assert_array_equal(again.to_numpy(n), want[n])


def test_incomplete_store_is_not_read(tmp_path: Path) -> None:
    x = _x(12)
    path = tmp_path / "K.zarr"
    ks = dist.compute_kernel(NET, x, None, "ntk", store=path, tile=5, client="threads")
    (path / ".infnets" / "tiles" / "0.1.json").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        dist.open_kernel_store(path).to_numpy("ntk")
    with pytest.raises(ValueError, match="incomplete"):
        dist.solve_posterior_mean(path, np.ones(12), get="ntk")
    assert "tiles done 5/6" in repr(dist.open_kernel_store(path)) and ks.shape == (12, 12)


def test_worker_killed_mid_run(tmp_path: Path) -> None:
    """A worker process dies (SIGKILL) mid-run: Dask reruns its tiles, the matrix is exact."""
    from distributed import Client

    from infnets._src.scale.store import compute_store

    x = _x(24)
    ref = dist.compute_kernel(
        NET, x, None, "ntk", store=tmp_path / "ref.zarr", tile=4, client="threads"
    ).to_numpy("ntk")
    cluster = dist.local_cluster(2, processes=True)
    killed: list[int] = []
    try:
        with Client(cluster, set_as_default=False) as c:
            c.run(lambda: __import__("infnets._src.scale.store"))  # warm imports
            pids = c.run(os.getpid)

            def kill_one(tile: tuple[int, int]) -> None:
                if not killed:
                    pid = sorted(pids.values())[0]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

            ks = compute_store(
                NET, x, None, "ntk", tmp_path / "K.zarr", 4, c, delay=0.3, on_tile=kill_one
            )
    finally:
        cluster.close()
    assert killed
    assert ks.last_run is not None and len(ks.last_run.computed) == 21
    assert ks.is_complete() and ks.verify() == []
    np.testing.assert_array_equal(ks.to_numpy("ntk"), ref)


def test_embedded_cluster_runs_kernel_matrix_without_a_client() -> None:
    from infnets._src.scale.cluster import active_client

    if active_client() is not None:
        pytest.skip("a default Dask client is already active")
    client = dist.embedded_client(n_workers=1, processes=False)  # the default sizes to the host
    try:
        assert dist.embedded_client() is client and active_client() is client
        x = _x(9)
        k = dist.kernel_matrix(NET, x, None, "nngp", tile=4)  # client=None: the embedded one
        got = client.compute(k, sync=True)
        np.testing.assert_allclose(got, NET.kernel_fn(x, None, "nngp").numpy(), rtol=1e-10)
    finally:
        dist.close_embedded_client()
    assert active_client() is None


def test_embedded_cluster_is_lazy_and_optional() -> None:
    """import infnets does not import dask; importing infnets.distributed does not either."""
    code = (
        "import sys, infnets, infnets.distributed, infnets.stax\n"
        "assert 'dask' not in sys.modules and 'zarr' not in sys.modules, sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------- solvers
def _problem(n: int = 60, m: int = 7, k: int = 2) -> tuple[Any, ...]:
    x, xt = _x(n, 4, seed=5), _x(m, 4, seed=6)
    y = torch.stack([torch.sin(x[:, 0]), torch.cos(x[:, 1])], 1)[:, :k]
    return x, xt, y


@pytest.mark.parametrize("preconditioner", ["nystrom", "jacobi", None])
def test_cg_agrees_with_direct_solve(preconditioner: str | None) -> None:
    x, _, y = _problem()
    k = NET.kernel_fn(x, None, "ntk")
    ridge = 1e-3 * float(k.diagonal().mean())
    res = dist.cg_solve(k, y, shift=ridge, tol=1e-12, preconditioner=preconditioner, rank=20)
    direct = torch.linalg.solve(k + ridge * torch.eye(len(k), dtype=k.dtype), y)
    assert res.converged
    torch.testing.assert_close(res.x, direct, rtol=1e-8, atol=1e-8)
    one = dist.cg_solve(k.numpy(), y[:, 0].numpy(), shift=ridge, tol=1e-12)
    torch.testing.assert_close(one.x, direct[:, 0], rtol=1e-8, atol=1e-8)


def test_nystrom_needs_fewer_iterations() -> None:
    x, _, y = _problem(n=150)
    k = NET.kernel_fn(x, None, "nngp")
    ridge = 1e-4 * float(k.diagonal().mean())
    plain = dist.cg_solve(k, y, shift=ridge, tol=1e-10, preconditioner=None)
    nys = dist.cg_solve(k, y, shift=ridge, tol=1e-10, preconditioner="nystrom", rank=60)
    assert plain.converged and nys.converged
    assert nys.iterations < plain.iterations / 2
    torch.testing.assert_close(nys.x, plain.x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_posterior_mean_from_store(get: str, tmp_path: Path) -> None:
    x, xt, y = _problem()
    train = dist.compute_kernel(
        NET, x, None, ("nngp", "ntk"), store=tmp_path / "tt.zarr", tile=16, client="threads"
    )
    test = dist.compute_kernel(
        NET, xt, x, ("nngp", "ntk"), store=tmp_path / "xt.zarr", tile=16, client="threads"
    )
    k = torch.from_numpy(train.to_numpy(get))  # the solver's reference: the stored kernels
    kt = torch.from_numpy(test.to_numpy(get))
    ridge = 1e-3 * float(k.diagonal().mean())
    want = kt @ torch.linalg.solve(k + ridge * torch.eye(len(k), dtype=k.dtype), y)
    for method in ("cholesky", "cg"):
        got, info = dist.solve_posterior_mean(
            str(tmp_path / "tt.zarr"),
            y,
            test,
            get=get,
            diag_reg=1e-3,
            method=method,
            tol=1e-12,
            return_info=True,
        )
        assert info["method"] == method
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    # a Dask array and an absolute ridge; auto chooses Cholesky for a small matrix
    got, info = dist.solve_posterior_mean(
        train.to_dask(get),
        y[:, :1],
        kt.numpy(),
        diag_reg=ridge,
        diag_reg_absolute_scale=True,
        return_info=True,
    )
    assert info["method"] == "cholesky" and got.shape == (7, 1)
    torch.testing.assert_close(got, want[:, :1], rtol=1e-7, atol=1e-9)
    got = dist.solve_posterior_mean(
        train, y, None, get=get, diag_reg=1e-3, memory_limit=0, tol=1e-12
    )
    train_want = k @ torch.linalg.solve(k + ridge * torch.eye(len(k), dtype=k.dtype), y)
    torch.testing.assert_close(got, train_want, rtol=1e-7, atol=1e-9)


def test_posterior_mean_checks() -> None:
    x, xt, y = _problem(n=20)
    k = NET.kernel_fn(x, None, "nngp")
    with pytest.raises(ValueError, match="training points"):
        dist.solve_posterior_mean(k, y[:5])
    with pytest.raises(ValueError, match="second axis"):
        dist.solve_posterior_mean(k, y, torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="method"):
        dist.solve_posterior_mean(k, y, method="lu")
    bad = -torch.eye(20, dtype=torch.float64)
    with pytest.raises(ValueError, match="positive definite"):
        dist.solve_posterior_mean(bad, y, method="cholesky", diag_reg=0.0)
    with pytest.raises(ValueError, match="positive definite"):
        dist.solve_posterior_mean(bad, y, method="cg", preconditioner=None)


def test_run_record_is_json(tmp_path: Path) -> None:
    x = _x(8)
    dist.compute_kernel(NET, x, None, "nngp", store=tmp_path / "K.zarr", tile=4, client="threads")
    line = (tmp_path / "K.zarr" / ".infnets" / "runs.jsonl").read_text().splitlines()[0]
    assert json.loads(line)["computed"]


@pytest.mark.parametrize("method", ["cholesky", "cg"])
def test_gp_inference_matches_predict(method: str, tmp_path: Path) -> None:
    from infnets import predict

    x, xt, y = _problem(n=40, m=5)
    gets = ("nngp", "ntk")
    k = NET.kernel_fn(x, None, gets)
    kt = NET.kernel_fn(xt, x, gets)
    kxx = NET.kernel_fn(xt, None, gets)
    want = predict.gp_inference(k, y, diag_reg=1e-3)(("nngp", "ntk", "ntkgp"), kt, kxx)
    train = dist.compute_kernel(
        NET, x, None, gets, store=tmp_path / "tt.zarr", tile=16, client="threads"
    )
    test = dist.kernel_matrix(NET, xt, x, gets, tile=16, client="threads")
    for k_train in (k, train, str(tmp_path / "tt.zarr")):
        predict_fn = dist.gp_inference(k_train, y, diag_reg=1e-3, method=method, tol=1e-13)
        got = predict_fn(("nngp", "ntk", "ntkgp"), test if k_train is not k else kt, kxx)
        for g in ("nngp", "ntk", "ntkgp"):
            torch.testing.assert_close(
                getattr(got, g).mean, getattr(want, g).mean, rtol=1e-6, atol=1e-8
            )
            torch.testing.assert_close(
                getattr(got, g).covariance, getattr(want, g).covariance, rtol=1e-6, atol=1e-8
            )
        mean = predict_fn("ntk", kt)
        torch.testing.assert_close(mean, want.ntk.mean, rtol=1e-6, atol=1e-8)
    shared = dist.gp_inference(k.nngp, y, diag_reg=1e-3, method=method, tol=1e-13)
    torch.testing.assert_close(shared("ntk", kt.nngp), want.nngp.mean, rtol=1e-6, atol=1e-8)


def test_is_stored_kernel_and_unsupported_options(tmp_path: Path) -> None:
    x, _, y = _problem(n=12)
    ks = dist.compute_kernel(
        NET, x, None, ("nngp", "ntk"), store=tmp_path / "K.zarr", tile=8, client="threads"
    )
    lazy = dist.kernel_matrix(NET, x, None, ("nngp", "ntk"), tile=8, client="threads")
    for k in (
        ks,
        str(tmp_path / "K.zarr"),
        tmp_path / "K.zarr",
        ks["ntk"],
        ks.to_dask("ntk"),
        lazy,
    ):
        assert dist.is_stored_kernel(k), type(k)
    for k in (NET.kernel_fn(x, None, ("nngp", "ntk")), torch.eye(3), np.eye(3)):
        assert not dist.is_stored_kernel(k)
    with pytest.raises(NotImplementedError, match="jitter"):
        dist.gp_inference(ks, y, jitter="auto")
    with pytest.raises(NotImplementedError, match="untraced"):
        dist.gp_inference(ks, y[:, :, None].expand(12, 2, 3), trace_axes=(-1,))
    fn = dist.gp_inference(ks, y[:, :, None].expand(12, 2, 3), 1e-3, False, (1, 2))
    assert fn("nngp").shape == (12, 2, 3)


def test_predict_gp_inference_accepts_a_stored_kernel() -> None:
    """predict.gp_inference dispatches Dask arrays to the at-scale solver, same answer."""
    import dask.array as da

    from infnets import predict

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, dtype=torch.float64, generator=gen)
    y = torch.sin(x[:, :1])
    net = stax.serial(stax.Dense(8, W_std=1.5, b_std=0.1), stax.Relu(), stax.Dense(1))
    k = net.kernel_fn(x, None, "nngp")
    k_xt = net.kernel_fn(x[:5], x, "nngp")
    direct = predict.gp_inference(k, y, diag_reg=1e-3)("nngp", k_xt)
    lazy = da.from_array(k.numpy(), chunks=16)
    scaled = predict.gp_inference(lazy, y, diag_reg=1e-3)("nngp", k_xt)
    np.testing.assert_allclose(np.asarray(scaled), direct.numpy(), rtol=1e-6, atol=1e-8)
