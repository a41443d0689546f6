#!/bin/sh
# Run by the Dockerfiles at build time, with deploy/ mounted at /tmp/deploy: a virtualenv at $1
# on whatever Python 3 the base image has, after installing Debian's Python 3.11 where it has
# none, and the extra CA certificates of deploy/build-extra/ where there are any (a build
# behind a proxy that re-signs TLS).
set -eu
venv="$1"
if ! command -v python3 >/dev/null 2>&1; then
    apt-get update
    apt-get install -y --no-install-recommends python3 python3-venv libpython3.11 ca-certificates
    rm -rf /var/lib/apt/lists/*
fi
if ls /tmp/deploy/build-extra/*.crt >/dev/null 2>&1; then
    cp /tmp/deploy/build-extra/*.crt /usr/local/share/ca-certificates/
    update-ca-certificates
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --no-cache-dir --upgrade pip==25.3
