"""``python -m runv_py.shim --report-fd N --params JSON``: a per-sandbox shim started by
a multi-threaded caller (see spawn.py)."""
import argparse
import sys

from .params import ShimParams
from .spawn import serve


def main() -> int:
    parser = argparse.ArgumentParser(prog="runv_py.shim")
    parser.add_argument("--report-fd", type=int, required=True)
    parser.add_argument("--params", required=True)
    args = parser.parse_args()
    return serve(ShimParams.from_json(args.params), args.report_fd)


if __name__ == "__main__":
    sys.exit(main())
