"""Host-side helpers shared by every entry point: state directories that are removed
without descending into mounts, and processes identified across pid reuse."""
