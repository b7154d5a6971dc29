#!/usr/bin/env bash
# Print the provider's version. It lives in one place, provider/pyproject.toml's
# [project] version; schema.json's `version` (written by `make sdk`), the SDKs,
# the plugin archive's name and the provider's GetPluginInfo all take it from there.
set -euo pipefail
exec python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' \
  "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/provider/pyproject.toml"
