"""Run Neural Tangents 0.6.5 (jax 0.4.30, CPU, float64) side by side with infnets.

Neural Tangents (NT) lives in its own virtual environment, ``benchmarks/.nt-venv`` (git-ignored),
built on demand from the pins in ``benchmarks/nt_requirements.txt``. Every measurement runs in a
fresh subprocess of that venv, so a "first call" timing really includes tracing and XLA
compilation, and peak memory belongs to that measurement alone.

Honesty rules built into the snippets:

* ``JAX_ENABLE_X64=1``: inputs, parameters and kernels are float64 (the snippets check the
  output dtype and fail otherwise); ``JAX_PLATFORMS=cpu``; no persistent compilation cache.
* Inputs are ``np.random.default_rng(seed).standard_normal(shape)`` (float64), created and moved
  to the device before any clock starts. The infnets side gets the identical array from
  :func:`make_inputs` (``torch.from_numpy(make_inputs(shape, seed))``).
* Kernel functions are wrapped in ``jax.jit``; every timed call ends with
  ``jax.block_until_ready`` on all outputs. ``first_s`` is the first call in the fresh
  process (trace + compile + run), ``steady_s`` the median of ``repeats`` later calls.
* Architectures are given as NT ``stax`` code strings; the FC/MLP/CNN helpers return the code
  they ran under ``"arch"`` so the infnets side can build the same network.

TensorFlow is never installed: NT 0.6.5 imports it only from ``neural_tangents.experimental``
(``empirical_tf``), and the subprocess preamble registers an empty module under that name in
``sys.modules`` before ``import neural_tangents``. The preamble also re-exports two names that
jax 0.4.30 dropped from ``jax.interpreters.ad`` (``source_info_util``, ``config``) and that NT
0.6.5's STRUCTURED_DERIVATIVES empirical NTK still reads; without them it raises
AttributeError. Aliases only: the shimmed eNTK matches an explicit Jacobian contraction to 1e-15.

Caveat: XLA:CPU float64 convolutions are ~20x slower than float32 (a 64x32x32x64 3x3 conv:
8.5 s in float64 vs 0.4 s in float32; torch float64 conv2d: 0.6 s), so NT's float64 CNN eNTK is
very slow on CPU. That is NT's real float64 cost; ``dtype="float32"`` exists to also report a
float32 NT number, which must be labelled as such.

API (all run in the caller's interpreter, the NT work happens in the subprocess)::

    ensure_nt_venv(path=NT_VENV, *, base_python=None, quiet=True) -> str     # venv python
    run_nt(code, timeout=1800.0, *, env=None, python=None) -> dict
    make_inputs(shape, seed=0) -> np.ndarray                                  # float64
    fc_arch(act="relu", depth=5, width=512, W_std=1.4, b_std=0.1, out_dim=1) -> str
    mlp_arch(width=2048, depth=3, out_dim=10, W_std=1.4, b_std=0.1) -> str
    cnn_arch(channels=64, depth=4, out_dim=10, W_std=1.4, b_std=0.1, filter_shape=(3, 3)) -> str
    nt_kernel_timing(arch_code, x_shape, get=("nngp", "ntk"), repeats=3, *, seed=0,
                     save_path=None, timeout=1800.0) -> dict
    nt_fc_kernel_timing(act="relu", depth=5, width=512, W_std=1.4, b_std=0.1, n=4000, d=64,
                        get=("nngp", "ntk"), repeats=3, *, seed=0, save_path=None) -> dict
    nt_empirical_ntk_timing(arch_code, x_shape, repeats=3, *, trace_axes=(-1,), vmap_axes=0,
                            implementation="STRUCTURED_DERIVATIVES", seed=0, param_seed=0,
                            dtype="float64", save_path=None, timeout=1800.0) -> dict
    nt_empirical_ntk_mlp_timing(n=64, d=128, width=2048, depth=3, out_dim=10, repeats=3, **kw)
    nt_empirical_ntk_cnn_timing(n=64, hw=32, c_in=3, channels=64, depth=4, out_dim=10,
                                repeats=3, **kw)

Timing helpers return at least ``{"first_s", "steady_s", "maxrss_mb"}``; see each docstring.
``maxrss_mb`` is the peak resident set size of the whole subprocess (from ``os.wait4``), which
includes the jax runtime; ``rss_after_import_mb`` is the baseline right after the imports.

Run ``python benchmarks/_nt.py`` to build the venv and print the reference timings.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
NT_VENV = BENCH_DIR / ".nt-venv"
NT_REQUIREMENTS = BENCH_DIR / "nt_requirements.txt"
_MARKER = ".infnets-nt-ready"
_RESULT_TAG = "@@NT_RESULT@@ "
# jaxlib 0.4.30 ships wheels for these CPython versions only.
_SUPPORTED_PY = ((3, 9), (3, 10), (3, 11), (3, 12))

# Executed in the NT subprocess before the user snippet.
_PREAMBLE = (
    '''\
import os, sys, types, time, json, resource
import importlib.metadata as _md
assert os.environ.get("JAX_PLATFORMS") == "cpu"
X64 = os.environ.get("JAX_ENABLE_X64") == "1"  # run_nt sets 1 unless env= overrides it
_t_import0 = time.perf_counter()
# NT 0.6.5 imports TensorFlow / tf2jax only via `neural_tangents.experimental`; stub it out.
sys.modules.setdefault(
    "neural_tangents.experimental", types.ModuleType("neural_tangents.experimental"))
import numpy as np
import jax
import jax.numpy as jnp
import neural_tangents as nt
from neural_tangents import stax
# NT 0.6.5's STRUCTURED_DERIVATIVES empirical NTK reads `ad.source_info_util` and
# `ad.config.jax_enable_checks` from the public `jax.interpreters.ad`, which jax 0.4.30 no
# longer re-exports. Re-export the module and the config object under those names (aliases
# only: no computation changes).
import jax.interpreters.ad as _pub_ad
from jax._src import source_info_util as _source_info_util
if not hasattr(_pub_ad, "source_info_util"):
    _pub_ad.source_info_util = _source_info_util
if not hasattr(_pub_ad, "config"):
    _pub_ad.config = jax.config
assert bool(jax.config.jax_enable_x64) == X64, "jax_enable_x64 does not match JAX_ENABLE_X64"
IMPORT_S = time.perf_counter() - _t_import0
RSS_AFTER_IMPORT_MB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_inputs(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(tuple(shape))


def emit(result):
    """Print the single JSON result line that run_nt() parses."""
    result = dict(result)
    result.setdefault("import_s", IMPORT_S)
    result.setdefault("rss_after_import_mb", RSS_AFTER_IMPORT_MB)
    result.setdefault(
        "maxrss_self_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    result.setdefault("versions", {"neural_tangents": nt.__version__, "jax": jax.__version__,
                                   "jaxlib": _md.version("jaxlib"), "numpy": np.__version__})
    result.setdefault("devices", [str(d) for d in jax.devices()])
    sys.stdout.write("'''
    + _RESULT_TAG
    + '''" + json.dumps(result) + "\\n")
    sys.stdout.flush()


def time_calls(fn, repeats):
    """(first_s, [steady times]): first call in this process, then `repeats` more calls."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(int(repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, first, times
'''
)


class NTError(RuntimeError):
    """The NT venv could not be built or an NT snippet failed."""


# --------------------------------------------------------------------------------------------
# venv
# --------------------------------------------------------------------------------------------
def _venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def _pick_base_python(base_python: str | None) -> str:
    if base_python is not None:
        return base_python
    if sys.version_info[:2] in _SUPPORTED_PY:
        return sys.executable
    for minor in (12, 11, 10, 9):
        exe = shutil.which(f"python3.{minor}")
        if exe:
            return exe
    raise NTError(
        f"jaxlib 0.4.30 needs CPython 3.9-3.12 but this is {sys.version.split()[0]} and no "
        "python3.9-3.12 is on PATH; pass base_python=..."
    )


def _fingerprint(base_python: str) -> str:
    h = hashlib.sha256(NT_REQUIREMENTS.read_bytes())
    h.update(os.path.realpath(base_python).encode())
    return h.hexdigest()


def _run_checked(cmd: Sequence[str], quiet: bool, what: str) -> None:
    proc = subprocess.run(
        list(cmd),
        stdout=subprocess.PIPE if quiet else None,
        stderr=subprocess.STDOUT if quiet else None,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stdout or "")[-4000:]
        raise NTError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


def ensure_nt_venv(
    path: str | os.PathLike[str] = NT_VENV,
    *,
    base_python: str | None = None,
    quiet: bool = True,
) -> str:
    """Create (if needed) the Neural Tangents venv and return its python executable.

    Creates ``path`` with ``<base_python> -m venv`` and installs the complete pinned closure of
    ``nt_requirements.txt`` with ``pip install --no-deps --only-binary=:all:`` (no TensorFlow:
    see the module docstring), then smoke-tests ``import neural_tangents`` through the stub.
    A marker file records a hash of the requirements and base interpreter; when it matches, the
    call returns immediately. Concurrent callers are serialized with a file lock.

    Args:
        path: venv directory (default ``benchmarks/.nt-venv``, git-ignored).
        base_python: interpreter for ``-m venv`` (default: this one if CPython 3.9-3.12,
            otherwise the newest ``python3.1x`` on PATH that jaxlib 0.4.30 supports).
        quiet: hide pip output unless it fails.

    Returns:
        Absolute path of the venv's ``python``.
    """
    path = Path(path).resolve()
    py = _venv_python(path)
    marker = path / _MARKER
    if py.exists() and marker.exists():
        base = marker.read_text().split("\n", 2)
        if len(base) >= 2 and base[0] == _fingerprint(base[1]):
            return str(py)

    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        base_py = _pick_base_python(base_python)
        fp = _fingerprint(base_py)
        if py.exists() and marker.exists() and marker.read_text().split("\n", 1)[0] == fp:
            return str(py)
        t0 = time.perf_counter()
        if marker.exists():
            marker.unlink()
        if not py.exists():
            _run_checked([base_py, "-m", "venv", str(path)], quiet, "venv creation")
        pip = [str(py), "-m", "pip", "--disable-pip-version-check", "--no-input"]
        if quiet:
            pip.append("-q")
        _run_checked(
            [*pip, "install", "--no-deps", "--only-binary=:all:", "-r", str(NT_REQUIREMENTS)],
            quiet,
            "pip install of nt_requirements.txt",
        )
        res = run_nt("emit({'ok': True})", timeout=600, python=str(py))
        if res.get("versions", {}).get("neural_tangents") != "0.6.5":
            raise NTError(f"NT smoke test gave unexpected versions: {res.get('versions')}")
        marker.write_text(f"{fp}\n{base_py}\n")
        if not quiet:
            print(f"[_nt] NT venv ready at {path} in {time.perf_counter() - t0:.1f}s")
    return str(py)


# --------------------------------------------------------------------------------------------
# running snippets
# --------------------------------------------------------------------------------------------
def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        and not k.startswith("JAX_")
    }
    env.update(
        JAX_ENABLE_X64="1",
        JAX_PLATFORMS="cpu",
        PYTHONNOUSERSITE="1",
        PYTHONUNBUFFERED="1",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    if extra:
        env.update(extra)
    return env


def run_nt(
    code: str,
    timeout: float = 1800.0,
    *,
    env: Mapping[str, str] | None = None,
    python: str | None = None,
) -> dict[str, Any]:
    """Run a Python snippet in a fresh NT-venv subprocess and return its JSON result.

    The snippet runs after a preamble that sets up float64 CPU jax, stubs
    ``neural_tangents.experimental`` and imports ``np``, ``jax``, ``jnp``, ``nt`` (neural
    tangents) and ``stax``. It also defines ``make_inputs(shape, seed)`` (same as
    :func:`make_inputs` here), ``time_calls(fn, repeats) -> (out, first_s, steady_times)`` and
    ``emit(dict)``, which prints the one result line (adding ``import_s``,
    ``rss_after_import_mb``, ``maxrss_self_mb``, ``versions``, ``devices``). A snippet that
    does not use ``emit`` may print a JSON object as its last stdout line instead.

    Args:
        code: Python source (dedented automatically).
        timeout: seconds before the subprocess (and its process group) is killed.
        env: extra environment variables for the subprocess (e.g. ``XLA_FLAGS``).
        python: interpreter to use (default: :func:`ensure_nt_venv`'s).

    Returns:
        The parsed JSON dict plus ``maxrss_mb`` (peak RSS of the subprocess, from
        ``os.wait4``) and ``wall_s`` (wall time of the whole subprocess).

    Raises:
        NTError: non-zero exit, timeout, or no JSON result line.
    """
    py = python if python is not None else ensure_nt_venv()
    with tempfile.TemporaryDirectory(prefix="infnets-nt-") as tmp:
        script = Path(tmp) / "snippet.py"
        script.write_text(_PREAMBLE + "\n# ---- snippet ----\n" + textwrap.dedent(code) + "\n")
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with open(out_path, "w") as fout, open(err_path, "w") as ferr:
            t0 = time.perf_counter()
            proc = subprocess.Popen(
                [py, "-u", str(script)],
                cwd=tmp,
                env=_child_env(env),
                stdin=subprocess.DEVNULL,
                stdout=fout,
                stderr=ferr,
                start_new_session=True,
            )
            deadline = t0 + timeout
            while True:
                pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    break
                if time.perf_counter() > deadline:
                    os.killpg(proc.pid, signal.SIGKILL)
                    os.wait4(proc.pid, 0)
                    proc.returncode = -9
                    raise NTError(f"NT snippet timed out after {timeout}s\n{_tail(err_path)}")
                time.sleep(0.02)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        stdout = out_path.read_text()
        if proc.returncode != 0:
            raise NTError(
                f"NT snippet failed (exit {proc.returncode})\n--- stderr ---\n{_tail(err_path)}"
                f"\n--- stdout ---\n{stdout[-2000:]}"
            )
        result = _parse_result(stdout)
        if result is None:
            raise NTError(
                f"NT snippet printed no JSON result\n--- stdout ---\n{stdout[-2000:]}"
                f"\n--- stderr ---\n{_tail(err_path)}"
            )
    result["maxrss_mb"] = rusage.ru_maxrss / 1024.0  # Linux: KiB
    result["wall_s"] = wall
    return result


def _tail(path: Path, n: int = 6000) -> str:
    try:
        return path.read_text()[-n:]
    except OSError:
        return ""


def _parse_result(stdout: str) -> dict[str, Any] | None:
    lines = stdout.splitlines()
    for line in reversed(lines):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG) :])
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


# --------------------------------------------------------------------------------------------
# inputs and architectures
# --------------------------------------------------------------------------------------------
def make_inputs(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """The float64 inputs the NT snippets use: ``default_rng(seed).standard_normal(shape)``."""
    return np.random.default_rng(seed).standard_normal(tuple(int(s) for s in shape))


_ACTS = {"relu": "stax.Relu()", "erf": "stax.Erf()"}


def fc_arch(
    act: str = "relu",
    depth: int = 5,
    width: int = 512,
    W_std: float = 1.4,
    b_std: float = 0.1,
    out_dim: int = 1,
) -> str:
    """Stax code of an FC net: ``depth`` x [Dense(width, W_std, b_std), act] + Dense(out_dim).

    The readout Dense uses the same ``W_std``/``b_std``; NTK parameterization (NT default).
    """
    if act not in _ACTS:
        raise ValueError(f"act must be one of {sorted(_ACTS)}, got {act!r}")
    dense = f"stax.Dense({width}, W_std={W_std!r}, b_std={b_std!r})"
    layers = [dense, _ACTS[act]] * depth
    layers.append(f"stax.Dense({out_dim}, W_std={W_std!r}, b_std={b_std!r})")
    return "stax.serial(" + ", ".join(layers) + ")"


def mlp_arch(
    width: int = 2048, depth: int = 3, out_dim: int = 10, W_std: float = 1.4, b_std: float = 0.1
) -> str:
    """Stax code of the finite MLP used for empirical NTK timings (ReLU)."""
    return fc_arch("relu", depth, width, W_std, b_std, out_dim)


def cnn_arch(
    channels: int = 64,
    depth: int = 4,
    out_dim: int = 10,
    W_std: float = 1.4,
    b_std: float = 0.1,
    filter_shape: tuple[int, int] = (3, 3),
) -> str:
    """Stax code: ``depth`` x [Conv(channels, 3x3, SAME), Relu], GlobalAvgPool, Dense(out_dim).

    NHWC inputs (NT's default dimension numbers ``('NHWC', 'HWIO', 'NHWC')``).
    """
    conv = (
        f"stax.Conv({channels}, {tuple(filter_shape)!r}, padding='SAME', "
        f"W_std={W_std!r}, b_std={b_std!r})"
    )
    layers = [conv, "stax.Relu()"] * depth
    layers += ["stax.GlobalAvgPool()", f"stax.Dense({out_dim}, W_std={W_std!r}, b_std={b_std!r})"]
    return "stax.serial(" + ", ".join(layers) + ")"


# --------------------------------------------------------------------------------------------
# timing helpers
# --------------------------------------------------------------------------------------------
def _summarize(res: dict[str, Any]) -> dict[str, Any]:
    times = res.get("steady_times") or []
    res["steady_s"] = float(np.median(times)) if times else None
    return res


def nt_kernel_timing(
    arch_code: str,
    x_shape: Sequence[int],
    get: str | Sequence[str] = ("nngp", "ntk"),
    repeats: int = 3,
    *,
    seed: int = 0,
    save_path: str | os.PathLike[str] | None = None,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Time NT's analytic ``kernel_fn(x, None, get)`` under ``jax.jit`` in a fresh process.

    ``x = make_inputs(x_shape, seed)`` (float64); the kernel is the (N, N) train-train kernel
    (``x2=None``). ``first_s`` is the first jitted call (trace + compile + run),
    ``steady_s`` the median of ``repeats`` further calls, each ending in
    ``block_until_ready`` on all outputs.

    Args:
        arch_code: NT stax expression returning ``(init_fn, apply_fn, kernel_fn)``, e.g.
            ``"stax.serial(stax.Dense(512, W_std=1.4, b_std=0.1), stax.Relu(), stax.Dense(1))"``.
        x_shape: input shape, batch first.
        get: kernel(s) to compute, e.g. ``("nngp", "ntk")`` or ``"nngp"``.
        repeats: number of steady-state calls.
        seed: input seed.
        save_path: if given, ``np.savez`` the computed kernels there (for correctness checks).
        timeout: subprocess timeout in seconds.

    Returns:
        dict with ``first_s``, ``steady_s``, ``steady_times``, ``maxrss_mb`` (subprocess peak
        RSS), ``rss_after_import_mb``, ``import_s``, ``dtype``, ``shapes``, ``arch``, ``x_shape``,
        ``get``, ``versions``, ...
    """
    get_t = (get,) if isinstance(get, str) else tuple(get)
    code = f"""
    ARCH = {arch_code!r}
    X_SHAPE = {tuple(int(s) for s in x_shape)!r}
    GET = {get_t!r}
    SAVE = {None if save_path is None else os.fspath(save_path)!r}
    _, _, kernel_fn = {arch_code}  # the architecture's NT stax code, spliced in
    x = jax.block_until_ready(jnp.asarray(make_inputs(X_SHAPE, {int(seed)})))
    assert x.dtype == jnp.float64
    kfn = jax.jit(kernel_fn, static_argnames=("get",))
    out, first, times = time_calls(lambda: kfn(x, None, get=GET), {int(repeats)})
    leaves = [getattr(out, g) for g in GET]
    assert all(leaf.dtype == jnp.float64 for leaf in leaves), [leaf.dtype for leaf in leaves]
    if SAVE:
        np.savez(SAVE, x=np.asarray(x), **{{g: np.asarray(v) for g, v in zip(GET, leaves)}})
    emit(dict(first_s=first, steady_times=times, dtype=str(leaves[0].dtype),
              shapes=[list(v.shape) for v in leaves], arch=ARCH, x_shape=list(X_SHAPE),
              get=list(GET), finite=bool(all(np.isfinite(np.asarray(v)).all() for v in leaves))))
    """
    return _summarize(run_nt(code, timeout=timeout))


def nt_fc_kernel_timing(
    act: str = "relu",
    depth: int = 5,
    width: int = 512,
    W_std: float = 1.4,
    b_std: float = 0.1,
    n: int = 4000,
    d: int = 64,
    get: str | Sequence[str] = ("nngp", "ntk"),
    repeats: int = 3,
    *,
    seed: int = 0,
    save_path: str | os.PathLike[str] | None = None,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """NT kernel timing of :func:`fc_arch` (``act`` in {'relu', 'erf'}) on ``x ~ N(0,1)^(n,d)``.

    Returns:
        ``{'first_s', 'steady_s', 'maxrss_mb', ...}`` as :func:`nt_kernel_timing`.
    """
    arch = fc_arch(act, depth, width, W_std, b_std, 1)
    return nt_kernel_timing(
        arch, (n, d), get, repeats, seed=seed, save_path=save_path, timeout=timeout
    )


def nt_empirical_ntk_timing(
    arch_code: str,
    x_shape: Sequence[int],
    repeats: int = 3,
    *,
    trace_axes: Sequence[int] = (-1,),
    vmap_axes: int | None = 0,
    implementation: str = "STRUCTURED_DERIVATIVES",
    seed: int = 0,
    param_seed: int = 0,
    dtype: str = "float64",
    save_path: str | os.PathLike[str] | None = None,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Time ``jax.jit(nt.empirical_ntk_fn(apply_fn, ...))(x, None, params)`` for a finite net.

    The network is NT stax code (``init_fn``/``apply_fn``), initialized with
    ``init_fn(jax.random.PRNGKey(param_seed), x_shape)`` (float64 parameters); the result is
    the (N, N) empirical NTK traced over the logits (``trace_axes=(-1,)``, NT's default; pass
    ``trace_axes=()`` for the full (N, N, K, K) kernel). NT *normalizes* the trace: with
    ``trace_axes=(-1,)`` the result is ``J(x1) J(x2)^T / K`` summed over the K logits, i.e. the
    mean over logits (checked against an explicit ``jax.jacobian`` contraction to 1e-15).

    ``dtype="float32"`` casts parameters and inputs to float32 (the result's ``dtype`` says so).
    It exists because XLA:CPU float64 convolutions are ~20x slower than float32 ones (and ~12x
    slower than torch's float64 conv2d), which makes NT's float64 CNN eNTK take very long; label
    any float32 number as such when comparing with float64 infnets results.

    Returns:
        dict with ``first_s``, ``steady_s``, ``steady_times``, ``maxrss_mb``, ``n_params``,
        ``shape``, ``dtype``, ``arch``, ``implementation``, ...
    """
    code = f"""
    ARCH = {arch_code!r}
    X_SHAPE = {tuple(int(s) for s in x_shape)!r}
    SAVE = {None if save_path is None else os.fspath(save_path)!r}
    init_fn, apply_fn, _ = {arch_code}  # the architecture's NT stax code, spliced in
    _, params = init_fn(jax.random.PRNGKey({int(param_seed)}), X_SHAPE)
    DT = jnp.dtype({dtype!r})
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, DT), params)
    params = jax.block_until_ready(params)
    p_leaves = jax.tree_util.tree_leaves(params)
    assert all(p.dtype == DT for p in p_leaves), {{p.dtype for p in p_leaves}}
    x = jax.block_until_ready(jnp.asarray(make_inputs(X_SHAPE, {int(seed)}), DT))
    impl = nt.NtkImplementation.{implementation}
    ntk_fn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes={tuple(trace_axes)!r},
                                         vmap_axes={vmap_axes!r}, implementation=impl))
    out, first, times = time_calls(lambda: ntk_fn(x, None, params), {int(repeats)})
    assert out.dtype == DT, out.dtype
    if SAVE:
        np.savez(SAVE, x=np.asarray(x), ntk=np.asarray(out),
                 **{{f"param_{{i}}": np.asarray(p) for i, p in enumerate(p_leaves)}})
    emit(dict(first_s=first, steady_times=times, dtype=str(out.dtype), shape=list(out.shape),
              n_params=int(sum(p.size for p in p_leaves)), arch=ARCH, x_shape=list(X_SHAPE),
              implementation=str(impl), trace_axes={list(trace_axes)!r},
              finite=bool(np.isfinite(np.asarray(out)).all())))
    """
    # float32 runs with x64 off, so that nothing inside NT promotes to float64.
    env = {"JAX_ENABLE_X64": "0"} if jnp_dtype_is_32(dtype) else None
    return _summarize(run_nt(code, timeout=timeout, env=env))


def jnp_dtype_is_32(dtype: str) -> bool:
    """Whether ``dtype`` is a 32-bit float dtype name."""
    if np.dtype(dtype) == np.float32:
        return True
    if np.dtype(dtype) != np.float64:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return False


def nt_empirical_ntk_mlp_timing(
    n: int = 64,
    d: int = 128,
    width: int = 2048,
    depth: int = 3,
    out_dim: int = 10,
    repeats: int = 3,
    **kwargs: Any,
) -> dict[str, Any]:
    """Empirical NTK timing of :func:`mlp_arch` (3 x 2048 ReLU, 10 outputs) on (64, 128) inputs."""
    return nt_empirical_ntk_timing(mlp_arch(width, depth, out_dim), (n, d), repeats, **kwargs)


def nt_empirical_ntk_cnn_timing(
    n: int = 64,
    hw: int = 32,
    c_in: int = 3,
    channels: int = 64,
    depth: int = 4,
    out_dim: int = 10,
    repeats: int = 3,
    **kwargs: Any,
) -> dict[str, Any]:
    """Empirical NTK timing of :func:`cnn_arch` (4 x Conv64 3x3 SAME) on (64, 32, 32, 3) NHWC."""
    return nt_empirical_ntk_timing(
        cnn_arch(channels, depth, out_dim), (n, hw, hw, c_in), repeats, **kwargs
    )


def _fmt(name: str, r: dict[str, Any]) -> str:
    steady = "     n/a" if r.get("steady_s") is None else f"{r['steady_s']:8.3f}"
    return (
        f"{name:<40} first {r['first_s']:8.3f}s  steady {steady}s  "
        f"peak RSS {r['maxrss_mb']:7.0f} MB (after import {r['rss_after_import_mb']:.0f} MB)"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Build the venv and print the reference NT timings (``--cnn-f64``: also the slow one)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--cnn-f64",
        action="store_true",
        help="also time the float64 CNN eNTK at N=64 (XLA:CPU float64 conv: tens of minutes)",
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    py = ensure_nt_venv(quiet=False)
    print(f"[_nt] venv python: {py} ({time.perf_counter() - t0:.1f}s)", flush=True)
    runs = [
        ("FC relu 5x512 N=8 d=64", lambda: nt_fc_kernel_timing("relu", n=8)),
        ("FC relu 5x512 N=4000 d=64", lambda: nt_fc_kernel_timing("relu")),
        ("FC erf 5x512 N=4000 d=64", lambda: nt_fc_kernel_timing("erf")),
        ("eNTK MLP 3x2048 N=64 d=128 f64", nt_empirical_ntk_mlp_timing),
        ("eNTK CNN 4xC64 N=64 32x32x3 f32", lambda: nt_empirical_ntk_cnn_timing(dtype="float32")),
        ("eNTK CNN 4xC64 N=8 32x32x3 f64", lambda: nt_empirical_ntk_cnn_timing(n=8, repeats=1)),
    ]
    if args.cnn_f64:
        runs.append(
            (
                "eNTK CNN 4xC64 N=64 32x32x3 f64",
                lambda: nt_empirical_ntk_cnn_timing(repeats=1, timeout=7200),
            )
        )
    for name, fn in runs:
        print(_fmt(name, fn()), flush=True)


if __name__ == "__main__":
    main()
