"""Launching real multi-process jobs from tests: one OS process per rank joined over loopback with
env:// rendezvous (what torchrun sets up), or torchrun itself."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # 2 cores shared by several ranks
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def start_ranks(argv: list[str], world_size: int, cwd: Path | None = None,
                rank_argv: dict[int, list[str]] | None = None, env: dict[str, str] | None = None
                ) -> list[subprocess.Popen]:
    """Start `python ARGV` (rank r: ARGV + rank_argv[r]) as the ranks of one gloo job, with `env` added to
    the environment; stdout and stderr merged."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        rank_env = base_env() | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                                 "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                                 "LOCAL_WORLD_SIZE": str(world_size)} | (env or {})
        extra = (rank_argv or {}).get(rank, [])
        procs.append(subprocess.Popen([sys.executable, *argv, *extra], env=rank_env, cwd=cwd, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    return procs


def run_ranks(argv: list[str], world_size: int, timeout: float = 180, cwd: Path | None = None, check: bool = True,
              rank_argv: dict[int, list[str]] | None = None, env: dict[str, str] | None = None):
    """Run `python ARGV` (rank r: ARGV + rank_argv[r]) as `world_size` ranks of one gloo job; return their
    CompletedProcess results, each asserted to succeed when `check`."""
    procs = start_ranks(argv, world_size, cwd, rank_argv, env)
    results = []
    try:
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, None))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, result in enumerate(results):
        assert not check or result.returncode == 0, f"rank {rank} failed ({result.returncode}):\n{result.stdout}"
    return results


def run_python(argv: list[str], timeout: float = 180, cwd: Path | None = None, check: bool = True,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *argv], env=base_env() | (env or {}), cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"{argv} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result
