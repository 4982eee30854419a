"""containerd-shim-runvpy-v2 without site's start-up: ``python3 -S
/path/to/runv_py/shimv2/launch.py ARGS`` (setup.sh writes that wrapper over pip's
console script, which cannot pass -S).

containerd runs the shim's ``start`` on every RunPodSandbox and waits for it: site's
.pth files (setuptools' editable finder, certifi, ...) cost it some 25 ms, and the
interpreter's own start more. runv_py is found as runv_py/cli/launch.py finds it.
"""
import os
import sys

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    cli = os.path.join(os.path.dirname(here), "cli")
    sys.path[:1] = [cli] if sys.path and sys.path[0] == here else [cli] + sys.path[:1]
    import launch  # runv_py/cli/launch.py, by its path: runv_py is not importable yet
    sys.path.remove(cli)
    launch.install()
    from runv_py.shimv2.start import main
    main()
