"""The compiled (TorchInductor) kernels for large convolutional covariances.

Oracle: the eager layer-by-layer evaluation of the same architecture (an
independent code path: separate window-sum and activation implementations), on
problems forced onto the compiled path (``INFNETS_COMPILE=1``, compiling every
shape on first sight). Tiles of one shape keep the number of compilations small.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from infnets import stax
from infnets._src.evaluate import compiled

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="torch.compile needs a C++ compiler on CPU",
)


@pytest.fixture
def force_compiled(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(compiled, "COMPILE_AFTER", 0)

    def run(net, x1, x2, get, on):  # type: ignore[no-untyped-def]
        monkeypatch.setenv("INFNETS_COMPILE", "1" if on else "0")
        return net.kernel_fn(x1, x2, get, batch_size=4, progress=False)

    return run


NETS = {
    # pooling: full pixel-pair covariances, SAME padding, both activations with fused maps
    "gap": lambda: stax.serial(
        stax.Conv(8, (3, 3), padding="SAME", W_std=1.4, b_std=0.1),
        stax.Relu(),
        stax.Conv(8, (3, 3), padding="SAME", W_std=1.4, b_std=0.1),
        stax.Erf(a=1.2, b=0.8),
        stax.GlobalAvgPool(),
        stax.Dense(1, W_std=1.4, b_std=0.1),
    ),
    # strides and VALID padding, no bias, a leaky ReLU, average pooling; then a
    # Flatten readout, so the last layers keep per-position covariances only
    "strided-flatten": lambda: stax.serial(
        stax.Conv(8, (3, 2), strides=(2, 1), padding="VALID", W_std=1.2),
        stax.LeakyRelu(0.1),
        stax.AvgPool((2, 2)),
        stax.Conv(8, (2, 2), padding="SAME", W_std=1.1, b_std=0.3),
        stax.Relu(),
        stax.Flatten(),
        stax.Dense(1),
    ),
}


@pytest.mark.parametrize("name", sorted(NETS))
def test_compiled_kernels_equal_eager(name: str, force_compiled) -> None:  # type: ignore[no-untyped-def]
    net = NETS[name]()
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(12, 2, 7, 6, dtype=torch.float64, generator=gen)
    x1[5] = x1[2]  # duplicated image: correlation exactly 1 off the diagonal
    x2 = torch.randn(8, 2, 7, 6, dtype=torch.float64, generator=gen)
    for a, b in ((x1, None), (x1, x2)):
        eager = force_compiled(net, a, b, ("nngp", "ntk"), False)
        before = len(compiled._CACHE)
        fast = force_compiled(net, a, b, ("nngp", "ntk"), True)
        assert not compiled._BROKEN, compiled._BROKEN
        assert len(compiled._CACHE) > before or b is not None  # the compiled path ran
        # float64 round-off through the layers (the paths sum filter offsets in other orders)
        torch.testing.assert_close(fast.nngp, eager.nngp, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(fast.ntk, eager.ntk, rtol=1e-12, atol=1e-13)
        if b is None:  # diagonal 4 x 4 tiles are dense (not packed): symmetric to round-off
            torch.testing.assert_close(fast.nngp, fast.nngp.T, rtol=1e-15, atol=0)
    # NNGP only: the compiled kernels without an NTK
    eager_nngp = force_compiled(net, x1, None, "nngp", False)
    fast_nngp = force_compiled(net, x1, None, "nngp", True)
    torch.testing.assert_close(fast_nngp, eager_nngp, rtol=1e-12, atol=1e-13)


def test_compiled_path_is_skipped_where_it_does_not_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Small tensors (auto mode), autograd and INFNETS_COMPILE=0 stay eager."""
    t = torch.zeros(4, 4, dtype=torch.float64)
    big = torch.zeros(compiled.MIN_ENTRIES, dtype=torch.float64)
    monkeypatch.setenv("INFNETS_COMPILE", "auto")
    assert not compiled.enabled(t)
    assert compiled.enabled(big) == (not compiled._BROKEN)
    assert not compiled.enabled(big.clone().requires_grad_())
    monkeypatch.setenv("INFNETS_COMPILE", "1")
    assert compiled.enabled(t) == (not compiled._BROKEN)
    assert not compiled.enabled(t.clone().requires_grad_())
    monkeypatch.setenv("INFNETS_COMPILE", "0")
    assert not compiled.enabled(big)


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Empty compiled-kernel registries for one test (the process's are put back after)."""
    for name in ("_CACHE", "_SEEN"):
        monkeypatch.setattr(compiled, name, {})
    monkeypatch.setattr(compiled, "_QUEUED", set())
    monkeypatch.setattr(compiled, "_CALLS", {"active": 0, "ended": 0, "hot": 0, "touched": 0})
    return compiled


def test_default_compiles_in_the_background_and_matches_eager(
    monkeypatch: pytest.MonkeyPatch, fresh_state
) -> None:  # type: ignore[no-untyped-def]
    """Auto mode: calls never compile; a repeated pattern is compiled by the worker thread.

    The first call runs eager while the pattern is queued; after :func:`compiled.wait`
    the same call runs the compiled kernels, equal to eager to float64 round-off, and
    every compilation happened on the ``infnets-compile`` thread.
    """
    net = NETS["gap"]()
    x = torch.randn(10, 2, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("INFNETS_COMPILE", "0")
    eager = net.kernel_fn(x, None, ("nngp", "ntk"), batch_size=5, progress=False)
    monkeypatch.setenv("INFNETS_COMPILE", "auto")
    monkeypatch.setattr(compiled, "MIN_ENTRIES", 1)
    monkeypatch.setattr(compiled, "MIN_TOTAL", 1)  # every pattern pays at once
    threads: list[str] = []
    real = compiled._compile

    def spy(fn, n):  # type: ignore[no-untyped-def]
        threads.append(__import__("threading").current_thread().name)
        return real(fn, n)

    monkeypatch.setattr(compiled, "_compile", spy)
    first = net.kernel_fn(x, None, ("nngp", "ntk"), batch_size=5, progress=False)
    assert compiled.pending() > 0 or compiled._CACHE  # queued, not compiled by the call
    assert compiled.wait(timeout=600)
    assert not compiled._BROKEN, compiled._BROKEN
    assert compiled._CACHE and set(threads) == {"infnets-compile"}
    fast = net.kernel_fn(x, None, ("nngp", "ntk"), batch_size=5, progress=False)
    for k in (first, fast):
        torch.testing.assert_close(k.nngp, eager.nngp, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(k.ntk, eager.ntk, rtol=1e-12, atol=1e-13)


def test_background_compiler_matches_the_callers_thread_count() -> None:
    """The worker sets its own OpenMP thread count only: other threads keep theirs."""
    import threading

    before = torch.get_num_threads()
    seen: list[tuple[bool, int]] = []

    def worker() -> None:
        target = 1 if before > 1 else 2
        seen.append((compiled._openmp_threads(target), target))
        seen.append((True, torch.get_num_threads()))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    (ok, target), (_, now) = seen
    if ok:
        assert now == target
    assert torch.get_num_threads() == before


def test_wait_times_out_while_work_is_pending(fresh_state) -> None:  # type: ignore[no-untyped-def]
    compiled._QUEUED.add("never-finishes")
    assert compiled.pending() == 1
    assert compiled.wait(timeout=0.05) is False
    compiled._QUEUED.clear()
    assert compiled.wait(timeout=0.05) is True


def test_inputs_sharing_memory_are_copied() -> None:
    """Aliased inputs would miss the compiled code's guards: later ones are copied."""
    a = torch.randn(4, 3, dtype=torch.float64)
    out = compiled._unaliased((a, a, a[1:], 2.0, torch.ones(2)))
    assert out[0] is a and out[3] == 2.0
    ptrs = {t.untyped_storage().data_ptr() for t in out if isinstance(t, torch.Tensor)}
    assert len(ptrs) == 4  # no two tensors share memory any more
    for got, want in zip(out[:3], (a, a, a[1:]), strict=True):
        assert torch.equal(got, want) and got.stride() == want.stride()


def test_patterns_are_compiled_once_they_have_paid_and_then_their_siblings(
    monkeypatch: pytest.MonkeyPatch, fresh_state
) -> None:  # type: ignore[no-untyped-def]
    """Rent or buy: eager until a pattern has processed MIN_TOTAL entries; then the other
    patterns of the running computation (and of the next one) are queued as they come;
    a computation that touches no qualified pattern leaves the next one cold."""
    monkeypatch.setenv("INFNETS_COMPILE", "auto")
    monkeypatch.setattr(compiled, "MIN_TOTAL", 100)
    monkeypatch.setattr(compiled, "_JOBS", __import__("queue").Queue())  # no worker runs
    monkeypatch.setattr(compiled, "_WORKER", [object()])

    def build():  # type: ignore[no-untyped-def]
        return lambda t: t

    big, small = torch.zeros(60), torch.zeros(5)
    with compiled.problem():
        compiled._call(("a",), build, small)  # 5 entries: a one-off, not queued
        compiled._call(("b",), build, big)  # 60 < 100
        assert compiled.pending() == 0
        compiled._call(("b",), build, big)  # 120 >= 100: paid; the computation is hot
        assert compiled.pending() == 1
        compiled._call(("a",), build, small)  # a sibling of the hot computation
        assert compiled.pending() == 2
    with compiled.problem():  # follows one that touched a qualified pattern: starts hot
        compiled._call(("c",), build, small)
        assert compiled.pending() == 3
    with compiled.problem():  # follows one that touched none: starts cold
        compiled._call(("d",), build, small)
        assert compiled.pending() == 3
    compiled._QUEUED.clear()


def test_compilation_waits_for_the_call_that_queued_it(
    monkeypatch: pytest.MonkeyPatch, fresh_state
) -> None:  # type: ignore[no-untyped-def]
    """A first call is not slowed by the compiler: it starts when that call has ended."""
    import threading

    monkeypatch.setenv("INFNETS_COMPILE", "auto")
    monkeypatch.setattr(compiled, "DEFER_S", 600.0)
    started = threading.Event()
    real = compiled._compile

    def spy(fn, n):  # type: ignore[no-untyped-def]
        started.set()
        return real(fn, n)

    monkeypatch.setattr(compiled, "_compile", spy)

    def build():  # type: ignore[no-untyped-def]
        def fn(t: torch.Tensor) -> torch.Tensor:
            return t * 2.0

        return fn

    t = torch.ones(8, 8, dtype=torch.float64)
    monkeypatch.setattr(compiled, "MIN_TOTAL", 1)  # pays at once
    with compiled.problem():
        assert compiled._call(("test-defer",), build, t) is None  # eager meanwhile
        assert compiled.pending() == 1
        assert not started.wait(0.5)  # the worker waits for this computation to end
    assert started.wait(60)
    assert compiled.wait(timeout=600) and not compiled._BROKEN
    out = compiled._call(("test-defer",), build, t)
    assert out is not None and torch.equal(out, 2 * t)


def test_a_pattern_the_worker_cannot_match_stays_eager_once(
    monkeypatch: pytest.MonkeyPatch, fresh_state
) -> None:  # type: ignore[no-untyped-def]
    """Without a matching thread count the pattern is dropped for good, not re-queued."""
    monkeypatch.setenv("INFNETS_COMPILE", "auto")
    monkeypatch.setattr(compiled, "_openmp_threads", lambda n: False)
    built: list[int] = []

    def build():  # type: ignore[no-untyped-def]
        built.append(1)
        return lambda t: t + 1.0

    t = torch.ones(4, dtype=torch.float64)
    monkeypatch.setattr(compiled, "MIN_TOTAL", 1)
    with compiled.problem():
        assert compiled._call(("test-never",), build, t) is None
    assert compiled.wait(timeout=60)
    for _ in range(3):
        assert compiled._call(("test-never",), build, t) is None
    assert compiled.pending() == 0 and not built  # never compiled, never queued again


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_wait_for_the_parents_compiler(fresh_state) -> None:  # type: ignore[no-untyped-def]
    """The child of a fork has no compiler thread: its queue starts empty."""
    import os

    compiled._QUEUED.add("parent-pattern")
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 when the queue was forgotten
        os._exit(0 if compiled.pending() == 0 and compiled.wait(timeout=1) else 1)
    _, status = os.waitpid(pid, 0)
    assert compiled.pending() == 1  # the parent's queue is untouched
    compiled._QUEUED.clear()
    assert os.waitstatus_to_exitcode(status) == 0


def test_no_cxx_compiler_means_quietly_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Automatic mode never tries (nor warns) without a C++ compiler; explicit mode tries."""
    big = torch.zeros(compiled.MIN_ENTRIES, dtype=torch.float64)
    monkeypatch.setattr(compiled, "_have_cxx", lambda: False)
    monkeypatch.setenv("INFNETS_COMPILE", "auto")
    assert not compiled.enabled(big)
    monkeypatch.setenv("INFNETS_COMPILE", "1")
    assert compiled.enabled(big) == (not compiled._BROKEN)


def test_exit_waits_for_the_compilation_in_progress(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A process that ends while the background compiler works exits cleanly (status 0).

    Without the exit hook, a daemon thread still in TorchInductor's native code while
    the interpreter tore down aborted the process (``std::terminate``, status 134) in
    about half of such exits.
    """
    import subprocess
    import sys

    code = (
        "import time, torch\n"
        "from infnets import stax\n"
        "from infnets._src.evaluate import compiled\n"
        "compiled.MIN_TOTAL = compiled.MIN_ENTRIES = compiled.MIN_PER_EXAMPLE = 1\n"
        "net = stax.serial(stax.Conv(4, (3, 3), padding='SAME'), stax.Relu(),\n"
        "                  stax.Conv(4, (3, 3), padding='SAME'), stax.Relu(), stax.Flatten())\n"
        "x = torch.randn(16, 1, 6, 6, dtype=torch.float64)\n"
        "net.kernel_fn(x, None, 'ntk', batch_size=4, progress=False)\n"
        "t0 = time.time()\n"
        "while compiled.pending() and not compiled._CACHE and time.time() - t0 < 120:\n"
        "    time.sleep(0.05)\n"
        "print('queued', compiled.pending() + len(compiled._CACHE))\n"
    )
    env = {**__import__("os").environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    env["INFNETS_COMPILE"] = "auto"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "queued" in proc.stdout and "queued 0" not in proc.stdout
    assert "terminate" not in proc.stderr
