"""Write a docker-archive image tarball (what `docker save` writes) from local files.

Used for images that must exist without any registry or Docker engine, e.g. the pause
image of the local cluster.  `ctr images import` and `docker load` both read the result.

    python ocitar.py --ref NAME:TAG --out image.tar [--entrypoint /x] SRC:DEST [SRC:DEST ...]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile


def build(
    ref: str,
    out: str,
    files: list[tuple[str, str]],
    entrypoint: list[str],
    user: str = "65535:65535",
) -> None:
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
        for src, dest in files:
            src = os.path.realpath(src)  # a symlinked binary goes in as the file itself
            info = t.gettarinfo(src, arcname=dest.lstrip("/"))
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(src, "rb") as fh:
                t.addfile(info, fh)
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": entrypoint,
            "User": user,
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "quicproxy conformance ocitar.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    layer_name = diff_id.split(":", 1)[1] + "/layer.tar"
    manifest = [{"Config": config_name, "RepoTags": [ref], "Layers": [layer_name]}]
    with tarfile.open(out, mode="w") as t:
        for name, data in (
            (layer_name, layer_bytes),
            (config_name, config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ref", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--entrypoint", action="append", default=[])
    ap.add_argument("--user", default="65535:65535", help="uid:gid the image runs as")
    ap.add_argument("files", nargs="+", help="SRC:DEST")
    a = ap.parse_args()
    build(a.ref, a.out, [tuple(f.split(":", 1)) for f in a.files], a.entrypoint, a.user)  # type: ignore[misc]


if __name__ == "__main__":
    main()
