"""``infnets kernel``: help, results, refusals, and resuming after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dask.array", reason="the distributed extra (dask) is not installed")
pytest.importorskip("distributed", reason="the distributed extra (dask.distributed) is missing")
pytest.importorskip("zarr", reason="the distributed extra (zarr) is not installed")

from infnets import stax  # noqa: E402
from infnets.cli import main  # noqa: E402
from infnets.distributed import compute_kernel, open_kernel_store  # noqa: E402

ARCH = "serial(Dense(256, W_std=1.4, b_std=0.05), Relu(), stax.Dense(1, W_std=1.2))"
NET = stax.serial(stax.Dense(256, W_std=1.4, b_std=0.05), stax.Relu(), stax.Dense(1, W_std=1.2))


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x1.npy", rng.standard_normal((30, 6)))
    np.save(tmp_path / "x2.npy", rng.standard_normal((11, 6)).astype(np.float32))
    (tmp_path / "arch.txt").write_text(ARCH + "\n")
    return tmp_path


def test_help_documents_everything(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["kernel", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--arch",
        "--x1",
        "--x2",
        "--get",
        "--out",
        "--tile",
        "--scheduler",
        "--workers",
        "--dtype",
        "--device",
        "--torch-threads",
        "--no-verify",
        "--no-progress",
        "--summary",
        "INFNETS_TILE_DELAY",
        "@FILE",
        "never evaluated",
    ):
        assert flag in text.replace("\n", " ") or flag in text, flag


@pytest.mark.parametrize("x2", [False, True])
def test_cli_matches_kernel_fn(data: Path, x2: bool) -> None:
    out = data / "K.zarr"
    argv = [
        "kernel",
        "--arch",
        f"@{data / 'arch.txt'}",
        "--x1",
        str(data / "x1.npy"),
        "--out",
        str(out),
        "--tile",
        "8",
        "--workers",
        "0",
        "--no-progress",
        "--summary",
        str(data / "s.json"),
    ]
    if x2:
        argv += ["--x2", str(data / "x2.npy"), "--get", "ntk"]
    assert main(argv) == 0
    x1 = torch.from_numpy(np.load(data / "x1.npy"))
    other = torch.from_numpy(np.load(data / "x2.npy")).double() if x2 else None
    store = open_kernel_store(out)
    for name in store.names:
        want = NET.kernel_fn(x1, other, name).numpy()
        np.testing.assert_allclose(store.to_numpy(name), want, rtol=1e-10, atol=1e-12)
    summary = json.loads((data / "s.json").read_text())
    assert summary["total_tiles"] == len(summary["computed"]) == (8 if x2 else 10)
    assert main(argv) == 0  # a rerun reuses everything
    assert json.loads((data / "s.json").read_text())["computed"] == []


def test_cli_on_a_dask_scheduler(data: Path) -> None:
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp://",
        dashboard_address=":0",
    ) as cluster:
        argv = [
            "kernel",
            "--arch",
            ARCH,
            "--x1",
            str(data / "x1.npy"),
            "--get",
            "nngp",
            "--out",
            str(data / "K.zarr"),
            "--tile",
            "16",
            "--no-progress",
            "--scheduler",
            cluster.scheduler_address,
        ]
        assert main(argv) == 0
    x1 = torch.from_numpy(np.load(data / "x1.npy"))
    np.testing.assert_allclose(
        open_kernel_store(data / "K.zarr").to_numpy("nngp"),
        NET.kernel_fn(x1, None, "nngp").numpy(),
        rtol=1e-10,
    )


def test_cli_refusals(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = [
        "--x1",
        str(data / "x1.npy"),
        "--out",
        str(data / "K.zarr"),
        "--workers",
        "0",
        "--no-progress",
        "--tile",
        "16",
    ]
    assert main(["kernel", "--arch", "__import__('os').system('true')", *base]) == 2
    assert "only layer names" in capsys.readouterr().err
    assert main(["kernel", "--arch", "serial(Dense(8), lambda x: x)", *base]) == 2
    assert "lambdas" in capsys.readouterr().err
    assert main(["kernel", "--arch", ARCH, *base, "--get", "nngp,cov1"]) == 2
    assert main(["kernel", "--arch", ARCH, *base[:1], str(data / "nope.npy"), *base[2:]]) == 2
    assert "does not exist" in capsys.readouterr().err
    np.save(data / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert main(["kernel", "--arch", ARCH, "--x1", str(data / "obj.npy"), *base[2:]]) == 2
    assert "cannot read" in capsys.readouterr().err  # never unpickled
    assert main(["kernel", "--arch", ARCH, *base]) == 0
    capsys.readouterr()
    assert main(["kernel", "--arch", ARCH.replace("1.4", "1.5"), *base]) == 2
    assert "different computation" in capsys.readouterr().err
    assert main(["kernel", "--arch", ARCH, *base, "--dtype", "float32"]) == 2
    assert "dtype" in capsys.readouterr().err


def _markers(store: Path) -> set[str]:
    d = store / ".infnets" / "tiles"
    return {p.name for p in d.glob("*.json")} if d.is_dir() else set()


def test_kill_driver_and_resume(tmp_path: Path) -> None:
    """SIGKILL the command after some tiles; the rerun computes only the others, exactly."""
    rng = np.random.default_rng(1)
    np.save(tmp_path / "x.npy", rng.standard_normal((40, 5)))
    out = tmp_path / "K.zarr"
    cmd = [
        sys.executable,
        "-m",
        "infnets.cli",
        "kernel",
        "--arch",
        ARCH,
        "--x1",
        str(tmp_path / "x.npy"),
        "--out",
        str(out),
        "--tile",
        "8",
        "--workers",
        "0",
        "--no-progress",
        "--summary",
        str(tmp_path / "summary.json"),
    ]
    env = dict(os.environ, INFNETS_TILE_DELAY="0.5")
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while len(_markers(out)) < 3:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "no tiles were stored in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and anything it started
        proc.wait(timeout=60)
    done_before = {tuple(int(v) for v in name.split(".")[:2]) for name in _markers(out)}
    total = 15  # 5 x 5 tiles, upper triangle
    assert 3 <= len(done_before) < total
    assert not (tmp_path / "summary.json").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    computed = {tuple(t) for t in summary["computed"]}
    assert computed.isdisjoint(done_before)  # finished tiles were not recomputed
    assert computed | done_before == set(open_kernel_store(out).grid.tiles())
    assert summary["reused"] == len(done_before)

    ref = compute_kernel(
        NET,
        np.load(tmp_path / "x.npy"),
        None,
        ("nngp", "ntk"),
        store=tmp_path / "ref.zarr",
        tile=8,
        client="threads",
    )
    store = open_kernel_store(out)
    for name in ("nngp", "ntk"):
        np.testing.assert_array_equal(store.to_numpy(name), ref.to_numpy(name))
