"""The per-sandbox shim: one process per sandbox, which owns its VM through the sandbox
API and serves the CLI and the 0.2 daemon over ``shim.sock``.

``server`` is the shim itself, ``client`` and ``lifecycle`` how callers reach it,
``protocol`` the requests both sides share, ``records`` the state.json it keeps.
"""
