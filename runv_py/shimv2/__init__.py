"""containerd-shim-runvpy-v2: the containerd shim v2 for runv-py (runtime
``io.containerd.runvpy.v2``). ``main`` is the binary (start, delete, serve), ``service``
the ttrpc Task service, which owns its sandbox in-process through the sandbox API."""
