"""The OCI runtime spec as runv-py reads it: bundles and config.json, processes,
resources, hooks and runc's state JSON."""
