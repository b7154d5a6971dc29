"""Lay a Go module out as a module proxy serves one (the GOPROXY protocol's files).

usage: go-module-zip.py MODULE-DIR MODULE-PATH VERSION PROXY-DIR

Writes PROXY-DIR/MODULE-PATH/@v/{list, VERSION.info, VERSION.mod, VERSION.zip}, so
`GOPROXY=file://PROXY-DIR` resolves MODULE-PATH@VERSION without the repository's tag.
The zip holds every file under MODULE-DIR as MODULE-PATH@VERSION/<file>, in name order
with fixed times, so the same sources give the same bytes.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path

FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def lay_out(module_dir: Path, module_path: str, version: str, proxy_dir: Path) -> Path:
    if module_path.lower() != module_path:
        raise SystemExit(f"go-module-zip: {module_path} has capitals; the proxy's case encoding is not done here")
    at_v = proxy_dir / module_path / "@v"
    at_v.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in module_dir.rglob("*") if p.is_file())
    zip_path = at_v / f"{version}.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            info = zipfile.ZipInfo(f"{module_path}@{version}/{path.relative_to(module_dir).as_posix()}", FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    (at_v / f"{version}.mod").write_bytes((module_dir / "go.mod").read_bytes())
    (at_v / f"{version}.info").write_text(json.dumps({"Version": version, "Time": "1980-01-01T00:00:00Z"}) + "\n")
    (at_v / "list").write_text(f"{version}\n")
    return zip_path


if __name__ == "__main__":
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    module_dir, module_path, version, proxy_dir = sys.argv[1:]
    print(lay_out(Path(module_dir), module_path, version, Path(os.path.abspath(proxy_dir))))
