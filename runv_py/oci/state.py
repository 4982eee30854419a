"""runc's state JSON, the one document `state`, `list` and hooks agree on."""
OCI_VERSION = "1.0.2-dev"


def oci_state(cid: str, status: str, pid: int = 0, bundle: str = "", rootfs: str = "",
              created: str = "", owner: str = "", annotations: dict = None) -> dict:
    return {
        "ociVersion": OCI_VERSION,
        "id": cid,
        "pid": pid if status != "stopped" else 0,
        "status": str(status),
        "bundle": bundle,
        "rootfs": rootfs,
        "created": created,
        "owner": owner,
        "annotations": annotations or {},
    }


def now_rfc3339() -> str:
    import time
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e9):09d}Z"
