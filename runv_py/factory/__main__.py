"""`python -m runv_py.factory`: the node's VM factory process (what `runv-py factory
serve` runs; a shim starts it this way when it finds none)."""
import argparse
import logging
import sys

from .. import paths


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="runv-py factory serve")
    parser.add_argument("--kernel", default=paths.KERNEL)
    parser.add_argument("--initrd", default=paths.INITRD)
    parser.add_argument("--driver", default="")
    parser.add_argument("--pool", type=int, default=None, help="ready VMs per shape")
    parser.add_argument("--share", default=paths.DEFAULT_SHARE, choices=("9p", "virtiofs"))
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--memory", type=int, default=256)
    parser.add_argument("--max-cpus", type=int, default=0, help="room to grow (pod VMs)")
    parser.add_argument("--max-memory", type=int, default=0, help="room to grow, MiB")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s factory[%(process)d] %(levelname)s %(message)s")
    from ..drivers import probe
    from ..host import ksm
    from ..hyperstart.errors import RunvError
    from ..vm.boot import BootConfig
    from . import settings
    from .daemon import run
    if ksm.apply():
        logging.getLogger("runv_py.factory").info("KSM: the VMs' memory is mergeable")
    try:
        driver = probe(args.driver)
        if not getattr(driver, "supports_templates", False):
            raise RunvError(f"the factory makes VMs: driver {driver.name} makes none")
        # One NIC: a container's VM has one for the network its namespace gets, at boot
        # (a pod's) or between create and start (net/late.py).
        warm = [(BootConfig(cpus=args.cpus, memory_mib=args.memory, kernel=args.kernel,
                            initrd=args.initrd, share=args.share, max_cpus=args.max_cpus,
                            max_memory_mib=args.max_memory), 1)]
        pool = args.pool if args.pool is not None else settings()["pool"]
        return run(driver, pool, warm)
    except RunvError as e:
        logging.getLogger("runv_py.factory").error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
