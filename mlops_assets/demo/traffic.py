"""Real HTTP traffic for the local platform: the demo's users, and the tests' load.

`TrafficGenerator` sends requests at a steady rate through an InferenceService's router (sticky
user keys, A/B outcomes reported through the router's /-/feedback, a `shift` knob that moves the
users' data for drift drills); `send_traffic` sends a fixed number of V1 and V2 requests.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

from mlops_assets.core import http


class TrafficGenerator:
    """Background users: steady requests with sticky user keys and, for A/B tests, an outcome per
    request reported to the router's feedback endpoint. Runs on its own thread and event loop."""

    def __init__(
        self,
        platform,
        isvc: str,
        rate: float = 50.0,
        success: dict[str, float] | None = None,
        seed: int = 3,
        rows: list[dict] | None = None,
    ):
        import threading

        self.platform, self.isvc, self.rate = platform, isvc, rate
        #: The users' inputs for any model (e.g. its input example's rows); default: the fraud table.
        self.rows = rows
        self.success = success or {}
        self.shift = 0.0  # move the users' data distribution (drift drills)
        self.rng = random.Random(seed)
        self.counts: dict[tuple[str, int], int] = {}
        self.versions: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def start(self) -> TrafficGenerator:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def by_version(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (rev, code), n in self.counts.items():
            row = out.setdefault(self.versions.get(rev, rev), {})
            row[str(code)] = row.get(str(code), 0) + n
        return out

    def _run(self) -> None:
        import asyncio

        asyncio.run(self._main())

    async def _main(self) -> None:
        import asyncio

        import aiohttp

        from mlops_assets.demo.data import FEATURES, generate_fraud_data

        def make_bodies(shift: float) -> list[bytes]:
            if self.rows is not None:
                return [json.dumps({"instances": [row]}).encode() for row in self.rows]
            # A pool large next to what a drift window samples from it: a small pool's own deviation
            # from the population would add to the sampling noise the drift tests allow for, and raise
            # their false-alarm rate on healthy traffic.
            frame = generate_fraud_data(5000, seed=21, shift=shift)[FEATURES]
            return [json.dumps({"instances": [row]}).encode() for row in frame.to_dict(orient="records")]

        bodies, shift = make_bodies(self.shift), self.shift
        last_refresh = 0.0
        url = feedback = ""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            pending: set = set()
            while not self._stop.is_set():
                if self.shift != shift:
                    bodies, shift = make_bodies(self.shift), self.shift
                if time.monotonic() - last_refresh > 2:
                    status = self.platform.status(self.isvc)
                    url, feedback = status.predict_url("v1"), f"{status.url}/-/feedback"
                    self.versions = {rev: info["model_version"] for rev, info in status.revisions.items()}
                    last_refresh = time.monotonic()
                user = f"user-{self.rng.randrange(5000)}"
                task = asyncio.create_task(self._one(session, url, feedback, bodies[self.rng.randrange(len(bodies))], user))
                pending.add(task)
                task.add_done_callback(pending.discard)
                await asyncio.sleep(self.rng.expovariate(self.rate))
            if pending:
                await asyncio.wait(pending, timeout=10)

    async def _one(self, session, url: str, feedback: str, body: bytes, user: str) -> None:
        headers = {"content-type": "application/json", "x-user-key": user}
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                rev, code = resp.headers.get("x-mlops-revision", "?"), resp.status
        except Exception:  # noqa: BLE001 - a refused connection is a failed request to count, not a crash
            rev, code = "?", 599
        self.counts[(rev, code)] = self.counts.get((rev, code), 0) + 1
        if code == 200 and self.success:
            p = self.success.get(self.versions.get(rev, ""), self.success.get("*", 0.0))
            try:
                async with session.post(feedback, json={"user_key": user, "success": self.rng.random() < p}) as resp:
                    await resp.read()
            except Exception:  # noqa: BLE001
                pass


def send_traffic(url_v1: str, url_v2: str, n: int, seed: int = 7) -> dict[str, int]:
    """`n` requests: V1 and V2 with valid rows, and a few malformed ones (they must get 4xx)."""
    from mlops_assets.core.serving.payloads import v1_payload, v2_payload
    from mlops_assets.demo.data import FEATURES, generate_fraud_data

    frame = generate_fraud_data(max(n, 1), seed=seed)[FEATURES]
    rng = random.Random(seed)

    def one(i: int) -> str:
        kind = rng.random()
        if kind < 0.02:
            url, body = url_v1, b'{"instances": [{"amount": "not a number"}]}'
        elif kind < 0.3:
            url, body = url_v2, json.dumps(v2_payload(frame.iloc[i : i + 1])).encode()
        else:
            url, body = url_v1, json.dumps(v1_payload(frame.iloc[i : i + 1])).encode()
        try:
            return str(http.request(url, body=body, headers={"content-type": "application/json"}, timeout=10).status)
        except http.HttpUnavailableError:
            return "connection-error"

    counts: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=8) as pool:
        for code in pool.map(one, range(n)):
            counts[code] = counts.get(code, 0) + 1
    return counts


#: The rollout drills of the main job: (what, training seed, fault, strategy, expected outcome).
