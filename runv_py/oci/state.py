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


def rfc3339(when: float) -> str:
    """A time.time() value as runc writes times: UTC, nanoseconds."""
    import time
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when)) + f".{int(when % 1 * 1e9):09d}Z"


def now_rfc3339() -> str:
    import time
    return rfc3339(time.time())
