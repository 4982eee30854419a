"""runv-py: a VM-isolated OCI container runtime in the line of runV and Kata Containers."""
__version__ = "0.1.0"
