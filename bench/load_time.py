"""Code-location load time: loading `mlops_assets.definitions` vs a bare `import dagster`.

What it measures: the wall time a fresh interpreter needs to import the project's code location
(`import mlops_assets.definitions`, which imports dagster and every domain's assets and builds the
merged `defs`), i.e. what the Dagster webserver, daemon and every run worker pay on start-up.

Baseline: a fresh interpreter running `import dagster` alone, the floor any code location pays.
The definitions time *includes* the dagster import, so ratio = definitions / dagster; the target is
ratio <= 2.5 (the project adds at most 1.5x dagster's own cost; heavy libraries such as mlflow,
pandas, sklearn, kserve, kubernetes must stay out of the import path of the code location).

How: each sample is a fresh `python -c` subprocess (no shared import cache in memory) with
`MLOPS_HOME` set to a temporary directory; time is taken *inside* the subprocess with
`time.perf_counter()` around the import statement, so interpreter start-up and teardown are not
counted. One untimed warm-up of each kind fills the OS page cache first; then the two kinds are
interleaved (dagster, definitions, dagster, ...) for REPEATS rounds, and the medians are compared.
The definitions subprocess also reports, as information only, how long `defs.get_repository_def()`
takes afterwards (the code server resolves the definitions that way) and whether heavy libraries
were imported.

Run: python bench/load_time.py [--repeats 5]
Final line: definitions_load_s=<x> import_dagster_s=<y> ratio=<x/y>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HEAVY = ("pandas", "sklearn", "mlflow", "kserve", "kubernetes", "aiohttp", "scipy", "numpy")

DAGSTER_CODE = """
import time
t0 = time.perf_counter()
import dagster
t1 = time.perf_counter()
import json; print(json.dumps({"import_s": t1 - t0}))
"""

DEFINITIONS_CODE = f"""
import time
t0 = time.perf_counter()
import mlops_assets.definitions as d
t1 = time.perf_counter()
d.build_definitions().get_repository_def()
t2 = time.perf_counter()
import json, sys
heavy = {HEAVY!r}
print(json.dumps({{"import_s": t1 - t0, "resolve_s": t2 - t1, "heavy": [m for m in heavy if m in sys.modules]}}))
"""


def run(code: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=False)
    if out.returncode != 0:
        raise SystemExit(f"subprocess failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mlops-load-time-") as home:
        env = {**os.environ, "MLOPS_HOME": home}
        env.pop("PYTHONPROFILEIMPORTTIME", None)
        print(f"python={sys.executable} repeats={args.repeats} MLOPS_HOME={home}")
        run(DAGSTER_CODE, env)  # warm-up: page cache, .pyc files
        run(DEFINITIONS_CODE, env)
        dagster_s, defs_s, resolve_s, heavy = [], [], [], set()
        for i in range(args.repeats):
            d = run(DAGSTER_CODE, env)
            m = run(DEFINITIONS_CODE, env)
            dagster_s.append(d["import_s"])
            defs_s.append(m["import_s"])
            resolve_s.append(m["resolve_s"])
            heavy.update(m["heavy"])
            print(
                f"round {i + 1}: import_dagster={d['import_s']:.3f}s definitions={m['import_s']:.3f}s "
                f"(then get_repository_def={m['resolve_s']:.3f}s)"
            )

    x, y = statistics.median(defs_s), statistics.median(dagster_s)
    print(f"import dagster: median {y:.3f}s min {min(dagster_s):.3f}s max {max(dagster_s):.3f}s")
    print(f"definitions:    median {x:.3f}s min {min(defs_s):.3f}s max {max(defs_s):.3f}s (project's own share {x - y:+.3f}s)")
    print(f"get_repository_def after import (info): median {statistics.median(resolve_s):.3f}s")
    print(f"heavy libraries imported by the code location: {sorted(heavy) or 'none'}")
    print(f"target ratio <= 2.5: {'met' if x / y <= 2.5 else 'NOT met'}")
    print(f"definitions_load_s={x:.3f} import_dagster_s={y:.3f} ratio={x / y:.3f}")


if __name__ == "__main__":
    main()
