#!/usr/bin/env bash
# Install the project with its test extras into .venv (pinned by constraints.txt), install the
# services the tests use where this machine allows (Debian's prometheus, as root), lint, run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade "pip>=24"
.venv/bin/python -m pip install -q -c constraints.txt -e '.[test]'
if ! command -v prometheus >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian's prometheus (tests that need it skip, with the reason, where it cannot be had)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) || echo "prometheus could not be installed"
fi
.venv/bin/ruff check mlops_assets mlops_assets_tests bench
exec .venv/bin/python -m pytest "$@"
