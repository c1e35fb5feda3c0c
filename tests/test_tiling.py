"""Tiled evaluation under a memory budget: identical to untiled, upper triangle only,
clear errors before any work, and the spatial layout plan."""

from __future__ import annotations

import doctest
import mmap

import pytest
import torch

from infnets import stax
from infnets._src.evaluate import chunks, input_kernels, tiling

F64 = torch.float64


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _gap_net():
    return stax.serial(
        stax.Conv(8, (3, 3), padding="SAME", W_std=1.4, b_std=0.1),
        stax.Relu(),
        stax.Conv(8, (2, 2), padding="CIRCULAR", W_std=1.2),
        stax.Erf(),
        stax.GlobalAvgPool(),
        stax.Dense(1, 1.1, 0.2),
    )


def _flat_net():
    return stax.serial(
        stax.Conv(8, (3, 3), (2, 1), "VALID", W_std=1.4, b_std=0.1),
        stax.Relu(),
        stax.Flatten(),
        stax.Dense(1),
    )


def _spatial_net():  # ends with convolutional activations: full pixel pairs out
    return stax.serial(
        stax.Conv(4, (2, 2), padding="SAME", W_std=1.3, b_std=0.2),
        stax.Relu(),
        stax.AvgPool((2, 2), (1, 1)),
    )


def _fc_net():
    return stax.serial(stax.Dense(16, 1.5, 0.1), stax.Relu(), stax.Dense(1))


CASES = {
    "gap": (_gap_net, (19, 1, 4, 5)),
    "flatten": (_flat_net, (13, 2, 5, 4)),
    "spatial_out": (_spatial_net, (9, 1, 3, 4)),
    "fc": (_fc_net, (23, 6)),
}


def _close(a, b):
    # Spatial inputs: every entry is the same sequence of roundings, tiled or not. The
    # fully-connected input kernel is a BLAS product whose last bits may depend on the
    # block size (its diagonal, where arcsin would amplify them, is exact).
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("batch_size", [1, 4, 16])
def test_tiled_equals_untiled_symmetric(name, batch_size):
    make, shape = CASES[name]
    net, x = make(), _x(shape)
    ref = net.kernel_fn(x, None, None)
    k = net.kernel_fn(x, None, None, batch_size=batch_size)
    for field in ("nngp", "ntk", "cov1"):
        _close(getattr(k, field), getattr(ref, field))
    assert k.cov2 is None and k.shape1 == ref.shape1 and k.shape2 == ref.shape2


@pytest.mark.parametrize("name", list(CASES))
def test_tiled_equals_untiled_two_batches(name):
    make, shape = CASES[name]
    net, x1 = make(), _x(shape)
    x2 = _x((7,) + tuple(shape[1:]), seed=1)
    ref = net.kernel_fn(x1, x2, None)
    k = net.kernel_fn(x1, x2, None, batch_size=3)
    for field in ("nngp", "ntk", "cov1", "cov2"):
        _close(getattr(k, field), getattr(ref, field))
    got = net.kernel_fn(x1, x2, ("ntk", "cov2", "nngp"), batch_size=5)
    _close(got.ntk, ref.ntk)
    _close(got.cov2, ref.cov2)


@pytest.mark.parametrize("name", ["gap", "spatial_out"])
def test_short_last_block_is_padded_to_the_tile_shape(name, monkeypatch):
    """A short last block (1 or 9 examples of 10) is filled up with copies of the first
    examples, so every tile has one shape; the padding pairs are dropped."""
    make, shape = CASES[name]
    net = make()
    x1 = _x((51,) + tuple(shape[1:]), seed=2)
    x2 = _x((49,) + tuple(shape[1:]), seed=4)
    monkeypatch.setattr(tiling, "PAD_FRACTION", 0.2)
    sizes = []
    real = tiling._single
    monkeypatch.setattr(
        tiling,
        "_single",
        lambda *a: (
            sizes.append((a[1].shape[0], None if a[2] is None else a[2].shape[0])) or real(*a)
        ),
    )
    for a, b in ((x1, None), (x1, x2)):
        ref = net.kernel_fn(a, b, None)
        sizes.clear()
        k = net.kernel_fn(a, b, None, batch_size=10, progress=False)
        for field in ("nngp", "ntk", "cov1") + (("cov2",) if b is not None else ()):
            _close(getattr(k, field), getattr(ref, field))
        assert set(sizes) <= {(10, None), (10, 10)}  # one tile shape per layout
        assert k.nngp.shape[:2] == (51, 51 if b is None else 49)


def test_memory_budget_tiles_and_matches(monkeypatch):
    net, x = _gap_net(), _x((20, 1, 4, 5))
    ref = net.kernel_fn(x, None, ("nngp", "ntk"))
    per_pair = tiling.pair_bytes(net, x, True, True)
    calls = []
    real = tiling._single
    monkeypatch.setattr(tiling, "_single", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    k = net.kernel_fn(x, None, ("nngp", "ntk"), memory_budget=40 * per_pair, progress=False)
    _close(k.nngp, ref.nngp)
    _close(k.ntk, ref.ntk)
    assert len(calls) > 2  # one probe example, then several tiles
    assert max(calls) ** 2 * per_pair <= 40 * per_pair


def test_only_upper_triangle_of_tiles(monkeypatch):
    net, x = _flat_net(), _x((10, 2, 5, 4))
    seen = []
    real = tiling._single

    def spy(layer, a, b, *rest):
        seen.append((a.shape[0], None if b is None else b.shape[0]))
        return real(layer, a, b, *rest)

    monkeypatch.setattr(tiling, "_single", spy)
    net.kernel_fn(x, None, "nngp", batch_size=3)  # blocks 3, 3, 3, 1
    assert len(seen) == 4 * 5 // 2
    assert sum(b is None for _, b in seen) == 4  # diagonal tiles are symmetric problems


def test_threads_restored_after_parallel_tiles():
    """Tiles run on worker threads with single-threaded ops; the setting is restored."""
    threads = torch.get_num_threads()
    net, x = _gap_net(), _x((12, 1, 4, 5))
    k = net.kernel_fn(x, None, "ntk", batch_size=3)
    assert torch.get_num_threads() == threads
    _close(k, net.kernel_fn(x, None, "ntk"))


@pytest.mark.skipif(chunks._LIBC is None, reason="glibc heap controls (Linux) only")
def test_heap_is_trimmed_when_resident_size_grows(monkeypatch):
    """Tiled runs return freed memory to the OS once the resident size grows by ``keep``."""
    before = chunks._resident_bytes()
    block = mmap.mmap(-1, 64 << 20)  # new pages, whatever the heap holds
    block.write(b"\1" * (64 << 20))
    assert chunks._resident_bytes() >= before + (48 << 20)
    block.close()
    trims = []

    class Libc:  # records malloc_trim calls instead of making them
        def malloc_trim(self, pad):
            trims.append(pad)

        def mallopt(self, param, value):
            return 1

    monkeypatch.setattr(chunks, "_LIBC", Libc())
    heap = chunks.Heap(keep=64 << 20)
    heap.check()
    assert trims == []  # within the allowance
    heap.limit = 1  # as if the resident size had grown past it (RSS can shrink meanwhile)
    heap.check()
    assert trims == [0]
    # a tiled run on several threads goes through the check and still matches
    monkeypatch.setattr(tiling, "HEAP_KEEP_BYTES", -(1 << 20))  # the limit is already passed
    trims.clear()
    net, x = _gap_net(), _x((12, 1, 4, 5))
    k = net.kernel_fn(x, None, "ntk", batch_size=3)
    _close(k, net.kernel_fn(x, None, "ntk"))
    if tiling.thread_workers(x, 9) > 1:
        assert len(trims) == 9  # after each of the 9 tiles the threads completed


def test_progress_bar(capsys):
    net, x = _flat_net(), _x((8, 2, 5, 4))
    k = net.kernel_fn(x, None, "nngp", batch_size=2, progress=True)
    _close(k, net.kernel_fn(x, None, "nngp"))
    assert "kernel tiles" in capsys.readouterr().err


def test_one_pair_too_large_fails_before_any_work(monkeypatch):
    monkeypatch.setattr(tiling, "_single", lambda *a: pytest.fail("work started"))
    net, x = _gap_net(), _x((4, 1, 8, 8))
    with pytest.raises(MemoryError, match="one pair of examples"):
        net.kernel_fn(x, None, ("nngp", "ntk"), memory_budget=100_000)
    # per-position covariances (Flatten) need P, not P^2, per pair: this budget suffices
    monkeypatch.undo()
    assert tiling.pair_bytes(_flat_net(), x, False, True) < 100_000
    _flat_net().kernel_fn(x, None, "nngp", memory_budget=100_000)


def test_result_too_large_fails_before_tiles():
    net, x = _fc_net(), _x((400, 6))
    with pytest.raises(MemoryError, match="result alone"):
        net.kernel_fn(x, None, ("nngp", "ntk"), memory_budget=200_000)


def test_pair_bytes_follow_the_layout():
    x = _x((2, 3, 6, 5))
    net = _gap_net()
    full_ntk = tiling.pair_bytes(net, x, True, True)
    assert full_ntk == 2 * tiling.pair_bytes(net, x, True, False)
    assert full_ntk == 30 * tiling.pair_bytes(net, x, False, True)  # P^2 vs P
    branchy = stax.serial(stax.FanOut(3), stax.parallel(net, net, net), stax.FanInSum())
    assert tiling.pair_bytes(branchy, x, True, True) == 3 * full_ntk
    assert tiling.default_memory_budget(torch.device("cpu")) > 0


def test_plan_spatial():
    assert tiling.plan_spatial(_gap_net(), True, None) == (True, True)
    assert tiling.plan_spatial(_flat_net(), True, None) == (False, True)
    assert tiling.plan_spatial(_flat_net(), True, True) == (False, False)
    assert tiling.plan_spatial(_flat_net(), True, False) == (True, None)
    assert tiling.plan_spatial(_fc_net(), False, True) == (False, True)
    with pytest.raises(ValueError, match="GlobalAvgPool"):
        tiling.plan_spatial(_gap_net(), True, True)
    # pooling in one branch only: the FanOut input needs pixel pairs
    branchy = stax.serial(
        stax.Conv(4, (2, 2)),
        stax.FanOut(2),
        stax.parallel(stax.serial(stax.Relu(), stax.AvgPool((2, 2))), stax.Identity()),
        stax.FanInSum(),
        stax.Flatten(),
    )
    assert tiling.plan_spatial(branchy, True, None) == (True, True)


def test_bad_tiling_arguments():
    net, x = _flat_net(), _x((3, 2, 5, 4))
    with pytest.raises(ValueError, match="batch_size"):
        net.kernel_fn(x, None, "nngp", batch_size=0)
    with pytest.raises(ValueError, match="memory_budget"):
        net.kernel_fn(x, None, "nngp", memory_budget=-5)
    with pytest.raises(TypeError, match="memory_budget"):
        net.kernel_fn(x, None, "nngp", memory_budget="1GB")
    with pytest.raises(TypeError, match="progress"):
        net.kernel_fn(x, None, "nngp", progress="yes")
    with pytest.raises(TypeError):
        net.kernel_fn(x, None, "nngp", batchsize=2)


@pytest.mark.parametrize("module", [tiling, input_kernels])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, extraglobs={"torch": torch})
    assert result.failed == 0 and result.attempted > 0


def test_heap_tuning_is_lazy_and_opt_out(monkeypatch):
    """``mallopt`` is called only by tiled or large work, once, never with INFNETS_TUNE_HEAP=0."""
    calls = []

    class Libc:
        def malloc_trim(self, pad):
            return 1

        def mallopt(self, param, value):
            calls.append(param)
            return 1

    monkeypatch.setattr(chunks, "_LIBC", Libc())
    monkeypatch.setattr(chunks, "_HEAP_TUNED", [False])
    net, x = _gap_net(), _x((6, 1, 4, 5))
    net.kernel_fn(x, None, "nngp")  # one tile: no tuning
    assert calls == []
    monkeypatch.setenv("INFNETS_TUNE_HEAP", "0")
    net.kernel_fn(x, None, "nngp", batch_size=2)
    assert calls == []
    monkeypatch.delenv("INFNETS_TUNE_HEAP")
    net.kernel_fn(x, None, "nngp", batch_size=2)
    net.kernel_fn(x, None, "nngp", batch_size=3)
    assert len(calls) == 3  # three parameters, set once per process
    # an untiled computation tunes the heap too once its working set is large enough
    monkeypatch.setattr(chunks, "_HEAP_TUNED", [False])
    calls.clear()
    monkeypatch.setattr(tiling, "HEAP_TUNE_MIN_BYTES", 2 * tiling.pair_bytes(net, x, True, False))
    net.kernel_fn(x[:1], None, "nngp")  # one pair: below the threshold
    assert calls == []
    net.kernel_fn(x, None, "nngp")
    assert len(calls) == 3


def test_memory_estimate_follows_layers_that_enlarge_images():
    """pair_bytes counts the largest image any layer makes: a stride-2 ConvTranspose
    'SAME' doubles each axis (4x the positions, 16x the pixel pairs), an upsampling
    ImageResize too; shrinking layers keep the input's size as the bound."""
    x = _x((3, 1, 4, 5))
    plain = stax.serial(stax.Conv(2, (3, 3), padding="SAME"), stax.Relu(), stax.GlobalAvgPool())
    base = tiling.pair_bytes(plain, x, True, True)
    up = stax.serial(stax.ConvTranspose(2, (3, 3), (2, 2), "SAME"), stax.Relu(), plain)
    assert tiling.pair_bytes(up, x, True, True) == 16 * base
    assert tiling.pair_bytes(up, x, False, True) == 4 * tiling.pair_bytes(plain, x, False, True)
    resize = stax.serial(stax.ImageResize((-1, -1, 8, 15), "linear"), plain)
    assert tiling.pair_bytes(resize, x, True, True) == 36 * base
    shrink = stax.serial(stax.AvgPool((2, 2)), plain)
    assert tiling.pair_bytes(shrink, x, True, True) == base


def _depth_net():
    return stax.serial(
        stax.Dense(64, W_std=1.4, b_std=0.1),
        stax.Relu(),
        stax.Dense(64, W_std=1.2, b_std=0.2),
        stax.Erf(),
        stax.Dense(1, W_std=1.1),
    )


@pytest.mark.parametrize("x2_rows", [None, 7])
def test_per_layer_equals_separate_prefix_calls(monkeypatch, x2_rows):
    """One pass gives the kernel after every depth; each equals the prefix network's own
    kernel_fn, computed here on the fused, blocked fully-connected path (a second code path:
    small PAIR_CHUNK), so agreement is to rounding, not by construction."""
    monkeypatch.setattr(chunks, "PAIR_CHUNK", 64)
    net = _depth_net()
    x = _x((30, 5))
    x2 = None if x2_rows is None else _x((x2_rows, 5), seed=3)
    ks = net.kernel_fn(x, x2, ("nngp", "ntk"), per_layer=True)
    assert len(ks) == 5
    for depth, k in enumerate(ks, 1):
        ref = stax.serial(*net.layers[:depth]).kernel_fn(x, x2, ("nngp", "ntk"))
        torch.testing.assert_close(k.nngp, ref.nngp, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(k.ntk, ref.ntk, rtol=1e-12, atol=1e-14)
    chosen = net.kernel_fn(x, x2, "ntk", per_layer=[4, 2])
    torch.testing.assert_close(chosen[0], ks[3].ntk, rtol=0, atol=0)
    torch.testing.assert_close(chosen[1], ks[1].ntk, rtol=0, atol=0)


def test_per_layer_spatial_network():
    """A CNN with global pooling: intermediate records keep every pixel pair (the pooling
    needs them) and equal the prefix networks computed with diagonal_spatial=False."""
    net = stax.serial(
        stax.Conv(8, (3, 3), padding="SAME", W_std=1.3, b_std=0.1),
        stax.Relu(),
        stax.Conv(8, (3, 3), padding="SAME", W_std=1.3),
        stax.GlobalAvgPool(),
        stax.Dense(1),
    )
    x = _x((5, 2, 4, 3))
    ks = net.kernel_fn(x, None, None, per_layer=True)
    for depth, k in enumerate(ks, 1):
        ref = stax.serial(*net.layers[:depth]).kernel_fn(x, None, None, diagonal_spatial=False)
        assert k.nngp.shape == ref.nngp.shape
        torch.testing.assert_close(k.nngp, ref.nngp, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(k.ntk, ref.ntk, rtol=1e-12, atol=1e-14)


def test_per_layer_refusals():
    x = _x((6, 5))
    with pytest.raises(ValueError, match="per_layer needs a stax.serial"):
        stax.Dense(3).kernel_fn(x, None, "nngp", per_layer=True)
    with pytest.raises(ValueError, match=r"depths must lie in 1\.\.5"):
        _depth_net().kernel_fn(x, None, "nngp", per_layer=[6])
    with pytest.raises(TypeError, match="per_layer must be True or a sequence"):
        _depth_net().kernel_fn(x, None, "nngp", per_layer="all")
    with pytest.raises(MemoryError, match="per_layer computes"):
        _depth_net().kernel_fn(x, None, "nngp", per_layer=True, batch_size=2)
    branches = stax.serial(
        stax.Dense(4),
        stax.FanOut(2),
        stax.parallel(stax.Dense(4), stax.Identity()),
        stax.FanInSum(),
        stax.Relu(),
    )
    with pytest.raises(ValueError, match="depth 2 .* has 2 branches"):
        branches.kernel_fn(x, None, "nngp", per_layer=[2])
    assert len(branches.kernel_fn(x, None, "nngp", per_layer=[1, 4, 5])) == 3
