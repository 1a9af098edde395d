"""Small real-HTTP client helpers for the tests (aiohttp, keep-alive, bounded concurrency)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import dagster as dg

from mlops_assets.core.declaration import ModelDeclaration
from mlops_assets.core.serving.payloads import v1_payload
from mlops_assets.defs.models.assets import DECLARATION_KEY
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


def project_cli(command: str, *args: str, env: dict, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run one of the venv's commands (`dagster`, `dg`) from the project root, as a user would."""
    return subprocess.run(
        [str(Path(sys.executable).with_name(command)), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )


#: The demo's declaration, as in defs/models/fraud_detector/defs.yaml.
FRAUD = ModelDeclaration(name="fraud_detector", training="mlops_assets.demo.training:train_and_register")


def declared(*declarations: ModelDeclaration) -> dg.RepositoryDefinition:
    """A code location declaring these models, as the sensors read it (the declaration on `models/<name>`)."""
    specs = [dg.AssetSpec(["models", d.name], metadata={DECLARATION_KEY: d.model_dump(mode="json")}) for d in declarations]
    return dg.Definitions(assets=specs).get_repository_def()
