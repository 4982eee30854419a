"""Generated protobuf messages for the containerd shim v2 (see gen.sh)."""
