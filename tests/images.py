"""Container images the tests build themselves (no registry): a busybox rootfs as one
uncompressed layer, as an OCI layout tar (ctr import) or a docker-archive tar (docker
load, podman load)."""
import hashlib
import io
import json
import os
import tarfile

from runv_py.oci.busybox import make_bundle


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def busybox_layer(work: str) -> bytes:
    bundle = make_bundle(os.path.join(work, "image-bundle"), ["sh"])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        rootfs = os.path.join(bundle, "rootfs")
        for name in sorted(os.listdir(rootfs)):
            tar.add(os.path.join(rootfs, name), arcname=name)
    return buf.getvalue()


def image_config(layer: bytes, cmd=("sh",), entrypoint=None) -> bytes:
    config = {"Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": list(cmd)}
    if entrypoint:
        config["Entrypoint"] = list(entrypoint)
    return json.dumps({"architecture": "amd64", "os": "linux", "config": config,
                       "rootfs": {"type": "layers", "diff_ids": [digest(layer)]}}).encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def oci_archive(path: str, work: str, name: str, cmd=("sh",), entrypoint=None) -> str:
    """An OCI image layout tar holding ``name`` (e.g. docker.io/runvpy/busybox:test)."""
    layer = busybox_layer(work)
    config = image_config(layer, cmd, entrypoint)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest(layer), "size": len(layer)}],
    }).encode()
    index = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": digest(manifest), "size": len(manifest),
                       "platform": {"architecture": "amd64", "os": "linux"},
                       "annotations": {"io.containerd.image.name": name,
                                       "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}}],
    }).encode()
    with tarfile.open(path, "w") as tar:
        _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(tar, "index.json", index)
        for blob in (layer, config, manifest):
            _add(tar, "blobs/sha256/" + digest(blob).split(":")[1], blob)
    return path


def docker_archive(path: str, work: str, tag: str, cmd=("sh",)) -> str:
    """A `docker save` tar holding ``tag`` (e.g. runvpy/busybox:test)."""
    layer = busybox_layer(work)
    config = image_config(layer, cmd)
    config_name = digest(config).split(":")[1] + ".json"
    layer_dir = digest(layer).split(":")[1]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag],
                            "Layers": [f"{layer_dir}/layer.tar"]}]).encode()
    with tarfile.open(path, "w") as tar:
        _add(tar, config_name, config)
        _add(tar, f"{layer_dir}/layer.tar", layer)
        _add(tar, "manifest.json", manifest)
    return path


PAUSE_ENTRYPOINT = ("/bin/sleep", "2147483647")


def pause_archive(path: str, work: str, name: str) -> str:
    """An OCI image layout tar holding ``name``, a pod sandbox ("pause") image for
    containerd's CRI plugin (its sandbox_image): the busybox rootfs whose entrypoint
    sleeps forever. CRI ends it with SIGKILL, so it needs no signal handling."""
    return oci_archive(path, work, name, cmd=(), entrypoint=PAUSE_ENTRYPOINT)
