"""The hyperstart agent (guest PID 1), its wire protocol and the initrd builder.

Installed as ``runv_py.hyperstart``; copied into the initrd as plain ``hyperstart``,
so modules here import each other relatively and use only the standard library.
"""
