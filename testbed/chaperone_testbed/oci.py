"""Write OCI image archives (an image layout in a tar) without a registry or an image builder.

Why: the test bed's node needs a sandbox ("pause") image in containerd, and nothing can be
pulled here. An OCI archive is a small, fully specified format (image-spec: `oci-layout`,
`index.json`, content-addressed `blobs/sha256/...`), so the one image we make from a single
static binary is written directly; `ctr images import` reads it and names the image after the
index's `io.containerd.image.name` annotation. Everything is deterministic (sorted entries,
zero mtimes, gzip without a timestamp), so the same binary always gives the same digest.

Usage (hack/build-node.sh):
    python3 testbed/chaperone_testbed/oci.py single-binary --binary PATH --path /pause \
        --name chaperone.local/pause:TAG --out pause.oci.tar
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

__all__ = ["single_binary_archive"]

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def _layer(binary: bytes, path: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, path.lstrip("/"), binary, 0o755)
    return buf.getvalue()


def single_binary_archive(binary: Path, path: str, name: str, out: Path,
                          *, arch: str = "amd64") -> str:
    """Write an OCI archive of an image holding only `binary` at `path` as its entrypoint.

    Returns the manifest digest.
    """
    layer_tar = _layer(Path(binary).read_bytes(), path)
    layer_gz = gzip.compress(layer_tar, mtime=0)
    config = json.dumps({
        "architecture": arch, "os": "linux",
        "config": {"Entrypoint": [path], "User": "65535:65535"},
        "rootfs": {"type": "layers", "diff_ids": [_digest(layer_tar)]},
    }, sort_keys=True).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": LAYER_TYPE, "digest": _digest(layer_gz), "size": len(layer_gz)}],
    }, sort_keys=True).encode()
    index = json.dumps({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MANIFEST_TYPE, "digest": _digest(manifest), "size": len(manifest),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]},
        }],
    }, sort_keys=True).encode()
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        _add(tar, "index.json", index)
        for blob in (config, layer_gz, manifest):
            _add(tar, "blobs/sha256/" + hashlib.sha256(blob).hexdigest(), blob)
    return _digest(manifest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chaperone_testbed.oci")
    sub = parser.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("single-binary", help="an image of one static binary")
    one.add_argument("--binary", required=True, type=Path)
    one.add_argument("--path", required=True, help="where the binary lives in the image")
    one.add_argument("--name", required=True, help="image name for containerd")
    one.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    print(single_binary_archive(args.binary, args.path, args.name, args.out))


if __name__ == "__main__":
    main()
