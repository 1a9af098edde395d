"""Small real-HTTP client helpers for the tests (aiohttp, keep-alive, bounded concurrency)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from mlops_assets.core.serving.payloads import v1_payload
from mlops_assets.demo.data import FEATURES, generate_fraud_data


def valid_body(rows: int = 1, seed: int = 5) -> bytes:
    return json.dumps(v1_payload(generate_fraud_data(rows, seed=seed)[FEATURES])).encode()


def fire(url: str, n: int, body: bytes | None = None, headers_for=None, concurrency: int = 16) -> list[tuple[str, int]]:
    """Send `n` POSTs; return (revision that served, status) per request, in order."""
    body = body if body is not None else valid_body()

    async def run() -> list[tuple[str, int]]:
        sem = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

            async def one(i: int) -> tuple[str, int]:
                headers = {"content-type": "application/json", **(headers_for(i) if headers_for else {})}
                async with sem, session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    return resp.headers.get("x-mlops-revision", ""), resp.status

            return await asyncio.gather(*(one(i) for i in range(n)))

    return asyncio.run(run())


ROOT = Path(__file__).resolve().parents[1]


def project_cli(command: str, *args: str, env: dict) -> subprocess.CompletedProcess:
    """Run one of the venv's commands (`dagster`, `dg`) from the project root, as a user would."""
    return subprocess.run(
        [str(Path(sys.executable).with_name(command)), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
