"""Shared test setup: logical devices, a data cache, running binaries.

Every test file calls `setup_devices()` at import, before TensorFlow
initializes: under bazel each file is its own process, under pytest they
share one, and asking for the same split twice is a no-op.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Optional

import tfscale
from tfscale.strategies import cluster

NUM_CPUS = 4
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tfscale.__file__)))
_CACHE_DIR: list[str] = []


def setup_devices() -> None:
    """Splits the CPU into NUM_CPUS logical devices and initializes TensorFlow."""
    tfscale.configure_devices(virtual_cpus=NUM_CPUS)
    tfscale.local_devices()


free_port = cluster.free_port


def cache_dir() -> str:
    """One data cache per test process, so the synthetic set is written once."""
    if not _CACHE_DIR:
        root = os.environ.get("TEST_TMPDIR") or tempfile.gettempdir()
        _CACHE_DIR.append(tempfile.mkdtemp(prefix="tfscale-cache-", dir=root))
    return _CACHE_DIR[0]


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python -m module args...` from the repository root."""
    return run_python("-m", module, *args, timeout=timeout)


def train_binary(
    workdir: str, *overrides: str, config: str = "configs/default.py:smoke", timeout: float = 300
) -> subprocess.CompletedProcess:
    """Runs `tfscale-train --config=CONFIG --workdir=WORKDIR OVERRIDES...` on the test data cache."""
    return run_module(
        "tfscale.train",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.data.cache_dir={cache_dir()}",
        *overrides,
        timeout=timeout,
    )


def start_train_binary(
    workdir: str, *overrides: str, extra_env: Optional[dict[str, str]] = None, **popen_kwargs
) -> subprocess.Popen:
    """Starts `train_binary`'s command without waiting (to signal or kill it mid-run).

    `extra_env` is added to the environment, e.g. a worker's TF_CONFIG.
    """
    command = [
        sys.executable,
        "-m",
        "tfscale.train",
        "--config=configs/default.py:smoke",
        f"--workdir={workdir}",
        f"--config.data.cache_dir={cache_dir()}",
        *overrides,
    ]
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3", **(extra_env or {}))
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, **popen_kwargs)


def read_metrics(workdir: str) -> dict:
    """The `metrics.json` a training run wrote to `workdir`."""
    with open(os.path.join(workdir, "metrics.json")) as f:
        return json.load(f)


def run_python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `python args...` from the repository root, tfscale importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO_ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def self_signed_cert(directory: str) -> tuple[str, str]:
    """A one-day certificate for localhost and 127.0.0.1, and its key: (cert.pem, key.pem)."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def start_dispatcher(*args: str) -> tuple[subprocess.Popen, str]:
    """Starts `tfscale-dispatcher serve ARGS` on a free loopback port.

    Returns the process (the caller kills it) and the address it printed.
    """
    server = subprocess.Popen(
        [sys.executable, "-m", "tfscale.data.dispatcher", "serve", *args],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    return server, server.stdout.readline().split()[-1]
