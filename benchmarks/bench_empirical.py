"""Empirical NTK: infnets versus the two torch.func recipes (and Neural Tangents 0.6.5).

Problems (issue "Finite width"), the NTK traced over the 10 logits, ``x2 = None``:

* ``mlp``: ``Linear(128, 2048) -> ReLU -> Linear(2048, 2048) -> ReLU -> Linear(2048, 2048)
  -> ReLU -> Linear(2048, 10)`` on N = 64 inputs of dimension 128 (8.7M parameters);
* ``cnn``: 4 x ``[Conv2d(64, 3x3, padding=1) -> ReLU]`` -> global average pooling ->
  ``Linear(64, 10)`` on 64 images of 3 x 32 x 32 (112k parameters).

Methods, each in a fresh subprocess (so peak memory is its own):

* ``infnets``: ``infnets.empirical.empirical_ntk_fn(model)`` (``'auto'``, which picks the
  structured-derivatives algorithm here; the choice is printed, with ``chain`` when the
  hand-written backward pass of ``nn.Sequential`` chains is used and the number of chunks
  of output units when the cotangents are made chunk by chunk);
* ``torch.func JC`` / ``torch.func NTVP``: the Jacobian-contraction and NTK-vector-product
  recipes of the PyTorch tutorial "Neural Tangent Kernels" (written out below), in their
  tutorial form; when that form exceeds the memory cap it is retried with its outer
  ``vmap`` chunked (``chunk_size``), and the row says so;
* ``NT 0.6.5``: Neural Tangents' ``empirical_ntk_fn`` (jax.jit, structured derivatives) on
  the same architecture (NTK parameterization, NHWC), through ``benchmarks/_nt.py`` when
  its venv is available (``--nt``). Neural Tangents requires float64; so does the default.

``first`` is the first call in the process (everything a fresh process pays after building
the model), ``steady`` the best of ``--repeats`` later calls (the minimum: robust on a shared
machine; NT's harness reports its median), ``cpu`` the process CPU time of that best call
(all threads; with ``--threads 1`` it is insensitive to other load on the machine);
``peak MB`` is the peak
resident set size of the subprocess minus its size after the model and inputs were built.
Every subprocess runs under a memory cap (``--mem-gb``) and a time limit (``--timeout``);
a method that exceeds them is reported as such, not hidden. Results of the torch methods
are compared with infnets' (max relative difference).

Run::

    python benchmarks/bench_empirical.py                 # both problems, float64
    python benchmarks/bench_empirical.py --problems mlp --nt --repeats 3
    python benchmarks/bench_empirical.py --device cuda   # on a GPU (no memory cap)
    python benchmarks/bench_empirical.py --problems cnn --n 16 --threads 1   # CPU time
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROBLEMS: dict[str, dict[str, int]] = {
    "mlp": {"n": 64, "d": 128, "width": 2048, "depth": 3, "out": 10},
    "cnn": {"n": 64, "hw": 32, "c_in": 3, "channels": 64, "depth": 4, "out": 10},
}
METHODS = ("infnets", "torch.func JC", "torch.func NTVP")
_TAG = "@@BENCH@@ "


# ------------------------------------------------------------------------------ models
def build(problem: str, dtype: Any, device: str, seed: int = 0, n: int | None = None):  # type: ignore[no-untyped-def]
    """The model and the inputs of one problem (inputs ~ N(0, 1), as in ``_nt.make_inputs``);
    ``n`` overrides the number of examples."""
    import numpy as np
    import torch
    from torch import nn

    spec = dict(PROBLEMS[problem], **({"n": n} if n else {}))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if problem == "mlp":
        layers: list[nn.Module] = []
        d_in = spec["d"]
        for _ in range(spec["depth"]):
            layers += [nn.Linear(d_in, spec["width"]), nn.ReLU()]
            d_in = spec["width"]
        layers.append(nn.Linear(d_in, spec["out"]))
        model = nn.Sequential(*layers)
        x = rng.standard_normal((spec["n"], spec["d"]))
    else:
        layers = []
        c = spec["c_in"]
        for _ in range(spec["depth"]):
            layers += [nn.Conv2d(c, spec["channels"], 3, padding=1), nn.ReLU()]
            c = spec["channels"]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, spec["out"])]
        model = nn.Sequential(*layers)
        x = rng.standard_normal((spec["n"], spec["c_in"], spec["hw"], spec["hw"]))
    model = model.to(dtype=dtype, device=device).eval()
    return model, torch.as_tensor(x, dtype=dtype, device=device)


# ------------------------------------------------------------ the torch.func recipes
def recipe_jacobian_contraction(model, x1, x2, chunk_size=None):  # type: ignore[no-untyped-def]
    """Tutorial recipe 1: per-example Jacobians by ``vmap(jacrev)``, then ``einsum``.

    Traced over the logits and divided by their number (infnets' and NT's convention).
    """
    import torch
    from torch.func import functional_call, jacrev, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(p, x):  # type: ignore[no-untyped-def]
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    jac_fn = vmap(jacrev(fnet_single), (None, 0), chunk_size=chunk_size)
    jac1 = [j.flatten(2) for j in jac_fn(params, x1).values()]
    jac2 = jac1 if x2 is None else [j.flatten(2) for j in jac_fn(params, x2).values()]
    out = torch.stack([torch.einsum("Naf,Maf->NM", a, b) for a, b in zip(jac1, jac2)]).sum(0)
    return out / jac1[0].shape[1]


def recipe_ntk_vector_products(model, x1, x2, chunk_size=None):  # type: ignore[no-untyped-def]
    """Tutorial recipe 2: NTK-vector products ``J1 (J2^T e)`` for every pair of examples."""
    import torch
    from torch.func import functional_call, jvp, vjp, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    x2 = x1 if x2 is None else x2

    def fnet_single(p, x):  # type: ignore[no-untyped-def]
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    def get_ntk(a, b):  # type: ignore[no-untyped-def]
        def func_a(p):  # type: ignore[no-untyped-def]
            return fnet_single(p, a)

        def func_b(p):  # type: ignore[no-untyped-def]
            return fnet_single(p, b)

        output, vjp_fn = vjp(func_b, params)

        def get_ntk_slice(vec):  # type: ignore[no-untyped-def]
            (vjps,) = vjp_fn(vec)
            _, jvps = jvp(func_a, (params,), (vjps,))
            return jvps

        basis = torch.eye(output.numel(), dtype=output.dtype, device=output.device)
        return vmap(get_ntk_slice)(basis.view(output.numel(), -1))

    inner = vmap(get_ntk, (None, 0), chunk_size=chunk_size)
    result = vmap(inner, (0, None), chunk_size=chunk_size)(x1, x2)
    return torch.einsum("NMKK->NM", result) / result.shape[-1]


def run_method(method: str, model, x):  # type: ignore[no-untyped-def]
    """A zero-argument callable computing the (N, N) traced NTK with ``method``."""
    if method == "infnets":
        from infnets.empirical import empirical_ntk_fn

        ntk_fn = empirical_ntk_fn(model)
        plan = ntk_fn.plan(x)
        chunks = getattr(plan, "output_chunks", 1)
        note = plan.implementation + (", chain" if getattr(plan, "chain", False) else "")
        note += f", {chunks} output chunks" if chunks > 1 else ""
        return lambda: ntk_fn(x), note
    chunk = int(os.environ.get("BENCH_CHUNK", "0")) or None
    fn = recipe_jacobian_contraction if method == "torch.func JC" else recipe_ntk_vector_products
    return lambda: fn(model, x, None, chunk), f"chunk_size={chunk}" if chunk else "tutorial form"


# ------------------------------------------------------------------------------ worker
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the subprocess: build, time first and steady calls, report memory."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    device = spec["device"]
    model, x = build(spec["problem"], dtype, device, n=spec.get("n"))
    fn, note = run_method(spec["method"], model, x)
    _sync(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    first = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(spec["repeats"]):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    res = {
        "first_s": first,
        "steady_s": min(times) if times else None,
        "cpu_s": cpu[times.index(min(times))] if times else None,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0,
        "note": note,
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        res["gpu_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    if spec.get("save"):
        torch.save(out.detach().cpu(), spec["save"])
    return res


def run_subprocess(spec: dict[str, Any], timeout: float, mem_gb: float | None) -> dict[str, Any]:
    """Run :func:`worker` in a fresh interpreter under a memory cap and a time limit."""

    def limit() -> None:
        if mem_gb:
            cap = int(mem_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ)
    if spec.get("chunk"):
        env["BENCH_CHUNK"] = str(spec["chunk"])
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit, env=env
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f}s"}
    for line in proc.stdout.splitlines():
        if line.startswith(_TAG):
            return json.loads(line[len(_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
    if any(s in (proc.stderr or "") for s in ("memory", "alloc", "MemoryError")):
        return {"error": f"out of memory (cap {mem_gb:g} GB)"}
    return {"error": f"failed (exit {proc.returncode}): {tail[0][:120]}"}


# ------------------------------------------------------------------- Neural Tangents
def nt_timing(problem: str, repeats: int, timeout: float = 1800.0) -> dict[str, Any]:
    """The NT hook: ``problem`` name -> ``{first_s, steady_s, peak_mb, note}`` or error.

    Uses ``benchmarks/_nt.py`` (NT 0.6.5 / jax 0.4.30, CPU, float64, ``jax.jit``,
    ``NtkImplementation.STRUCTURED_DERIVATIVES``, ``trace_axes=(-1,)``) on the same
    architecture in NT's conventions (NTK parameterization, NHWC images).
    """
    sys.path.insert(0, str(BENCH_DIR))
    try:
        import _nt
    except ImportError as err:  # pragma: no cover - harness missing
        return {"error": f"benchmarks/_nt.py not importable ({err})"}
    spec = PROBLEMS[problem]
    try:
        _nt.ensure_nt_venv()
        if problem == "mlp":
            r = _nt.nt_empirical_ntk_mlp_timing(
                n=spec["n"],
                d=spec["d"],
                width=spec["width"],
                depth=spec["depth"],
                out_dim=spec["out"],
                repeats=repeats,
                timeout=timeout,
            )
        else:
            r = _nt.nt_empirical_ntk_cnn_timing(
                n=spec["n"],
                hw=spec["hw"],
                c_in=spec["c_in"],
                channels=spec["channels"],
                depth=spec["depth"],
                out_dim=spec["out"],
                repeats=repeats,
                timeout=timeout,
            )
    except Exception as err:  # noqa: BLE001 - reported in the table
        return {"error": f"NT failed: {str(err).splitlines()[0][:120]}"}
    peak = r["maxrss_mb"] - r.get("rss_after_import_mb", 0.0)
    return {
        "first_s": r["first_s"],
        "steady_s": r["steady_s"],
        "peak_mb": peak,
        "note": "jax.jit, STRUCTURED_DERIVATIVES (peak incl. params/inputs)",
    }


def jacobian_gb(problem: str, args: argparse.Namespace) -> float:
    """Size of the per-example Jacobians ``(N, O, P)`` the JC recipe stores."""
    import torch

    model, x = build(problem, getattr(torch, args.dtype), "meta")
    n_params = sum(p.numel() for p in model.parameters())
    item = torch.finfo(getattr(torch, args.dtype)).bits // 8
    return PROBLEMS[problem]["n"] * PROBLEMS[problem]["out"] * n_params * item / 2**30


# -------------------------------------------------------------------------------- main
def _fmt_s(v: float | None) -> str:
    return "      -" if v is None else f"{v:7.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--n", type=int, default=None, help="examples (default: the problem's)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per subprocess")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument(
        "--mem-gb",
        type=float,
        default=None,
        help="address-space cap per subprocess (default: 75%% of MemAvailable)",
    )
    ap.add_argument("--nt", action="store_true", help="also time Neural Tangents 0.6.5")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    mem_gb = args.mem_gb
    if mem_gb is None and args.device == "cpu":
        with open("/proc/meminfo") as fh:
            info = {ln.split(":")[0]: int(ln.split()[1]) for ln in fh}
        mem_gb = round(0.75 * info["MemAvailable"] / 2**20, 1)
    if args.device != "cpu":
        mem_gb = None
    import torch

    if args.n:
        for spec in PROBLEMS.values():
            spec["n"] = args.n
    print(
        f"torch {torch.__version__}, {args.device}, {args.dtype}, "
        f"{args.threads or torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"memory cap {mem_gb} GB, timeout {args.timeout:.0f}s, {args.repeats} repeats"
    )
    for problem in args.problems:
        print(f"\n== {problem}: {PROBLEMS[problem]} ==")
        print(
            f"{'method':<18} {'first s':>8} {'steady s':>8} {'cpu s':>7} {'peak MB':>8}"
            f" {'vs infnets':>10}"
            f" {'max rel diff':>12}  note"
        )
        rows: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for method in args.methods:
                spec = {
                    "problem": problem,
                    "method": method,
                    "dtype": args.dtype,
                    "device": args.device,
                    "repeats": args.repeats,
                    "n": args.n,
                    "threads": args.threads,
                    "save": os.path.join(tmp, f"{len(rows)}.pt"),
                }
                res = run_subprocess(spec, args.timeout, mem_gb)
                if "error" in res and method == "torch.func NTVP" and "memory" in res["error"]:
                    chunk = 1
                    res2 = run_subprocess(dict(spec, chunk=chunk), args.timeout, mem_gb)
                    res2["note"] = f"tutorial form {res['error']}; chunk_size={chunk}: " + (
                        res2.get("note") or res2.get("error", "")
                    )
                    res = res2 if "error" not in res2 else {"error": res2["note"]}
                if "error" not in res and os.path.exists(spec["save"]):
                    res["out"] = torch.load(spec["save"])
                rows[method] = res
            if args.nt:
                rows["NT 0.6.5"] = nt_timing(problem, args.repeats, args.timeout)
        base = rows.get("infnets", {})
        for method, res in rows.items():
            if "error" in res:
                if method == "torch.func JC" and "memory" in res["error"]:
                    res["error"] += (
                        f"; its Jacobians alone need {jacobian_gb(problem, args):.1f} GB"
                    )
                print(
                    f"{method:<18} {'':>8} {'':>8} {'':>7} {'':>8} {'':>10} {'':>12}  "
                    f"{res['error']}"
                )
                continue
            ratio = ""
            if base.get("steady_s") and res.get("steady_s"):
                ratio = f"{res['steady_s'] / base['steady_s']:9.1f}x"
            diff = ""
            if "out" in res and "out" in base:
                a, b = res["out"], base["out"]
                diff = f"{((a - b).abs().max() / b.abs().max()).item():12.1e}"
            gpu = f", GPU peak {res['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in res else ""
            print(
                f"{method:<18} {_fmt_s(res['first_s']):>8} {_fmt_s(res['steady_s']):>8} "
                f"{_fmt_s(res.get('cpu_s')):>7} {res['peak_mb']:8.0f} {ratio:>10} {diff:>12}  "
                f"{res['note']}{gpu}"
            )
    print("\n'vs infnets' = steady time / infnets' steady time (> 1: infnets is faster).")


if __name__ == "__main__":
    main()
