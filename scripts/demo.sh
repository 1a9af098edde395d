#!/usr/bin/env bash
# Install the project into .venv (pinned by constraints.txt) and run the main job: the whole model
# lifecycle on the embedded local platform, through a real Dagster instance and daemon. Debian's
# prometheus is installed where possible (as root); without it the demo skips the alert-driven loop.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# uv installs the pinned set in seconds where pip took about a minute; pip stays the fallback. Byte-compiled
# at install, as pip does: with PYTHONDONTWRITEBYTECODE set, every process would otherwise compile its imports.
.venv/bin/python -m pip install -q -c constraints.txt uv \
  && .venv/bin/python -m uv pip install -q --compile-bytecode --python .venv/bin/python -c constraints.txt -e . \
  || { .venv/bin/python -m pip install -q --upgrade "pip>=24" && .venv/bin/python -m pip install -q -c constraints.txt -e .; }
if ! command -v prometheus >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's prometheus (the self-healing loop of the demo needs its alerts)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) || echo "prometheus could not be installed"
fi
exec .venv/bin/mlops-assets demo "$@"
