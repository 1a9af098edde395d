#!/usr/bin/env bash
# Install the project into .venv (pinned by constraints.txt) and run the main job: the whole model
# lifecycle on the embedded local platform, through a real Dagster instance and daemon.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=24"
.venv/bin/python -m pip install -q -c constraints.txt -e .
exec .venv/bin/mlops-assets demo "$@"
