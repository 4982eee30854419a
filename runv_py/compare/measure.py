"""Measurements for `runv-py compare`: one bundle under the VM driver, the namespace
driver and runc.

Every runtime is driven through its own command line, as a user would (``runv-py run``,
``create``/``start``/``exec``/``delete``; ``runc run``/``exec``/``delete``), with a private
state root. This process makes itself a child subreaper, so every daemon a runtime leaves
behind (runv-py's shim and QEMU or namespace agent, runc's container process) becomes
our descendant: "memory added by the runtime" is the PSS of all our descendants while
the container idles. Workloads time themselves inside the container (busybox
``adjtimex`` prints the clock to the microsecond, and needs no privilege to read it), so
start-up costs stay out of the throughput figures.
"""
import ctypes
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

from .runtimes import CompareError, Runtime, runtimes  # noqa: F401  (CompareError: API)

PR_SET_CHILD_SUBREAPER = 36

# measure -> (label, unit, better): the rows of every table, in order.
MEASURES = {
    "start_to_exit_ms": ("start-to-exit of `true`", "ms", "lower"),
    "exec_ms": ("exec latency (`exec ID true`)", "ms", "lower"),
    "memory_pss_mib": ("memory added (PSS of its processes)", "MiB", "lower"),
    "seq_write_mbps": ("sequential write to rootfs", "MB/s", "higher"),
    "seq_read_mbps": ("sequential read from rootfs", "MB/s", "higher"),
    "small_file_ops": ("small-file create+delete", "ops/s", "higher"),
    "cpu_loop_s": ("CPU loop (100k shell iterations)", "s", "lower"),
    "syscall_kops": ("syscall loop (read+write of 1 byte)", "k syscalls/s", "higher"),
    "find_tree_s": ("`find` over a tree of files", "s", "lower"),
    "tar_x_mbps": ("`tar x` of an archive", "MB/s", "higher"),
}

SEQ_MB = 64
SMALL_FILES = 2000
CPU_ITERATIONS = 100000
SYSCALL_BYTES = 200000

TREE_FILES = 10000
TAR_MB = 50
MARKS = 9

# Each "@N" line is followed by adjtimex's report, which holds time.tv_sec/tv_usec. The
# tree to walk and the archive to unpack are made first, untimed.
WORK_SCRIPT = """
d=/.runv-compare-io; rm -rf $d; mkdir -p $d/small $d/tree $d/src || exit 1
cd $d/tree || exit 1; i=0; while [ $i -lt 100 ]; do mkdir d$i; cd d$i;
  seq 1 {per_dir} | xargs touch || exit 1; cd ..; i=$((i+1)); done; cd /
i=0; while [ $i -lt {tar_mb} ]; do dd if=/dev/zero of=$d/src/f$i bs=1048576 count=1 2>/dev/null;
  i=$((i+1)); done; tar cf $d/data.tar -C $d src && rm -rf $d/src || exit 1
echo @0; adjtimex; dd if=/dev/zero of=$d/seq bs=1048576 count={seq_mb} conv=fsync 2>/dev/null || exit 2
echo @1; adjtimex; dd if=$d/seq of=/dev/null bs=1048576 2>/dev/null || exit 3
echo @2; adjtimex; cd $d/small && seq 1 {small} | xargs touch && cd / && rm -rf $d/small || exit 4
echo @3; adjtimex; rm -f $d/seq
echo @4; adjtimex; i=0; while [ $i -lt {cpu} ]; do i=$((i+1)); done
echo @5; adjtimex; dd if=/dev/zero of=/dev/null bs=1 count={syscall} 2>/dev/null
echo @6; adjtimex; find $d/tree -type f | wc -l > /dev/null || exit 5
echo @7; adjtimex; mkdir $d/x && tar xf $d/data.tar -C $d/x && sync || exit 6
echo @8; adjtimex; rm -rf $d
"""


def work_script(tree_files: int = TREE_FILES, tar_mb: int = TAR_MB) -> str:
    return WORK_SCRIPT.format(per_dir=max(1, tree_files // 100), tar_mb=tar_mb, seq_mb=SEQ_MB,
                              small=SMALL_FILES, cpu=CPU_ITERATIONS, syscall=SYSCALL_BYTES)


def parse_marks(text: str, count: int = MARKS) -> list:
    """The times of the work script's marks @0..@(count-1), in seconds."""
    marks, current, sec = {}, None, 0
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("@") and line[1:].isdigit():
            current = int(line[1:])
        elif "time.tv_sec:" in line:
            sec = int(line.split(":")[1])
        elif "time.tv_usec:" in line and current is not None:
            marks[current] = sec + int(line.split(":")[1]) / 1e6
    if sorted(marks) != list(range(count)):
        raise CompareError(f"the workload script's timings are incomplete: {sorted(marks)}")
    return [marks[i] for i in range(count)]

def workload_figures(marks: list, tar_mb: int) -> dict:
    """The work script's measures from its marks (parse_marks), keyed as in MEASURES."""
    d = [max(marks[k + 1] - marks[k], 1e-6) for k in range(MARKS - 1)]
    return {"seq_write_mbps": SEQ_MB / d[0], "seq_read_mbps": SEQ_MB / d[1],
            "small_file_ops": 2 * SMALL_FILES / d[2], "cpu_loop_s": d[4],
            "syscall_kops": 2 * SYSCALL_BYTES / d[5] / 1000, "find_tree_s": d[6],
            "tar_x_mbps": tar_mb / d[7]}

PROBE_SCRIPT = r"""
echo "kernel=$(uname -r)"
echo "processes=$(ls /proc | grep -c '^[0-9][0-9]*$')"
if [ -r /proc/$HOSTPID/cmdline ] && tr '\0' ' ' < /proc/$HOSTPID/cmdline | grep -q "$MARK"; then
  echo "host_pid=yes"; else echo "host_pid=no"; fi
echo "mounts=$(cut -d' ' -f2 /proc/mounts | tr '\n' ' ')"
echo "netdevs=$(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\n' ' ')"
echo "cpus=$(grep -c '^processor' /proc/cpuinfo)"
echo "cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "mem_total_kb=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
ko=/dev/shm/runv-probe.ko; printf '\177ELF\002\001\001' > $ko 2>/dev/null || ko=/tmp/runv-probe.ko
printf '\177ELF\002\001\001' > $ko 2>/dev/null
echo "insmod=$(insmod $ko 2>&1 | head -1)"; rm -f $ko
echo "dmesg_lines=$(dmesg 2>/dev/null | wc -l)"
echo "dmesg_error=$(dmesg 2>&1 >/dev/null | head -1)"
"""

COMMON_MOUNTS = {"/", "/proc", "/sys", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue",
                 "/sys/fs/cgroup", "/run", "/tmp", "/etc/hosts", "/etc/hostname",
                 "/etc/resolv.conf"}


# ---- bundles, processes, memory ---------------------------------------------------------

def derived_bundle(source: str, target: str, args: list, env: dict = None,
                   writable: bool = False) -> str:
    """A bundle sharing ``source``'s rootfs but running ``args``."""
    with open(os.path.join(source, "config.json")) as f:
        spec = json.load(f)
    root = spec.get("root", {}).get("path", "rootfs")
    spec.setdefault("root", {})["path"] = os.path.abspath(os.path.join(source, root))
    if writable:
        spec["root"]["readonly"] = False
    process = spec.setdefault("process", {})
    process.update(args=args, terminal=False)
    process["env"] = list(process.get("env") or []) + [f"{k}={v}" for k, v in (env or {}).items()]
    os.makedirs(target, exist_ok=True)
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(spec, f, indent=2)
    return target


def descendants(pid: int) -> list:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def reap_orphans() -> None:
    """Collect the daemons that were re-parented to us (we are their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def summary(values: list) -> dict:
    return {"values": [round(v, 4) for v in values], "median": round(statistics.median(values), 4),
            "min": round(min(values), 4), "max": round(max(values), 4)}


# ---- measuring --------------------------------------------------------------------------

class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int):
        self.total = max(total, 1)
        self.done = 0

    def step(self, what: str) -> None:
        self.done = min(self.done + 1, self.total)
        width = 30
        filled = width * self.done // self.total
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done:3d}/{self.total} {what}"
        sys.stderr.write("\r" + line[:110].ljust(110))
        sys.stderr.flush()

    def finish(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def measure_runtime(rt: Runtime, bundle: str, work: str, runs: int, reps: int, tag: str,
                    probe_env: dict, progress: Progress, out: dict,
                    tree_files: int = TREE_FILES, tar_mb: int = TAR_MB) -> None:
    """Fill ``out`` measure by measure: what was measured before a failure is kept."""
    work = os.path.join(work, re.sub(r"[^a-z0-9]+", "-", rt.name))
    true_b = derived_bundle(bundle, os.path.join(work, "true"), ["true"])
    # 1. start-to-exit of `true`.
    times = []
    for i in range(runs):
        t0 = time.perf_counter()
        r = rt.run(true_b, f"cmp-{tag}-t{i}", timeout=120)
        times.append((time.perf_counter() - t0) * 1000)
        progress.step(f"{rt.name}: start-to-exit {i + 1}/{runs}")
        if r.returncode != 0:
            raise CompareError(f"{rt.name}: run true exited {r.returncode}: "
                               f"{r.stderr.decode(errors='replace').strip()[-300:]}")
    out["measures"]["start_to_exit_ms"] = summary(times)
    reap_orphans()
    # 2. exec latency and 3. memory, on one idle container.
    idle_b = derived_bundle(bundle, os.path.join(work, "idle"), ["sleep", "3600"])
    cid = f"cmp-{tag}-idle"
    try:
        rt.start_detached(idle_b, cid, timeout=120)
        progress.step(f"{rt.name}: container started")
        times = []
        for i in range(runs):
            t0 = time.perf_counter()
            status = rt.exec(cid, ["true"], timeout=60)
            times.append((time.perf_counter() - t0) * 1000)
            progress.step(f"{rt.name}: exec {i + 1}/{runs}")
            if status != 0:
                raise CompareError(f"{rt.name}: exec true exited {status}")
        out["measures"]["exec_ms"] = summary(times)
        time.sleep(1.0)  # let the idle container settle before weighing it
        ours = {int(probe_env["HOSTPID"])}  # the probes' sentinel is not the runtime's
        procs = {pid: (comm(pid), pss_kb(pid)) for pid in descendants(os.getpid())
                 if pid not in ours}
        total = sum(kb for _, kb in procs.values())
        out["measures"]["memory_pss_mib"] = summary([total / 1024])
        out["processes"] = [{"pid": pid, "comm": c, "pss_kb": kb} for pid, (c, kb) in procs.items()]
        progress.step(f"{rt.name}: memory")
    finally:
        rt.delete(cid)
        reap_orphans()
    # 4.-6. file I/O, CPU and syscalls, timed inside the container.
    work_b = derived_bundle(bundle, os.path.join(work, "work"),
                            ["sh", "-c", work_script(tree_files, tar_mb)], writable=True)
    rows = {k: [] for k in ("seq_write_mbps", "seq_read_mbps", "small_file_ops", "cpu_loop_s",
                            "syscall_kops", "find_tree_s", "tar_x_mbps")}
    for i in range(reps):
        r = rt.run(work_b, f"cmp-{tag}-w{i}", timeout=900)
        progress.step(f"{rt.name}: workloads {i + 1}/{reps}")
        if r.returncode != 0:
            raise CompareError(f"{rt.name}: workload script failed ({r.returncode}): "
                               f"{r.stderr.decode(errors='replace').strip()[-300:]}")
        figures = workload_figures(parse_marks(r.stdout.decode(errors="replace")), tar_mb)
        for key, value in figures.items():
            rows[key].append(value)
    for key, values in rows.items():
        out["measures"][key] = summary(values)
    # 7. isolation probes.
    probe_b = derived_bundle(bundle, os.path.join(work, "probe"),
                             ["sh", "-c", PROBE_SCRIPT], env=probe_env)
    r = rt.run(probe_b, f"cmp-{tag}-p", timeout=120)
    progress.step(f"{rt.name}: isolation probes")
    out["probes"] = parse_probes(r.stdout.decode(errors="replace"))
    reap_orphans()


def parse_probes(text: str) -> dict:
    raw = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {k: v.strip() for k, v in raw.items()}


def host_facts() -> dict:
    with open("/proc/self/mounts") as f:
        mounts = {line.split()[1] for line in f}
    with open("/proc/net/dev") as f:
        netdevs = [line.split(":")[0].strip() for line in f.readlines()[2:]]
    cpu_model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1])
    return {"kernel": os.uname().release, "cpus": os.cpu_count(), "cpu_model": cpu_model,
            "mem_total_kb": mem,
            # A container runtime mounts its own cgroupfs views there: not a leak.
            "mounts": sorted(m for m in mounts - COMMON_MOUNTS if not m.startswith("/sys/fs/cgroup/")),
            "netdevs": [n for n in netdevs if n != "lo"]}


def judge_probes(probes: dict, host: dict) -> dict:
    """What the raw probe output means: a row per isolation question."""
    if not probes:
        return {}
    seen_mounts = set(probes.get("mounts", "").split())
    seen_net = set(probes.get("netdevs", "").split()) - {"lo"}
    insmod = probes.get("insmod", "")
    if "not permitted" in insmod:
        module = "no (permission denied)"
    elif "not support" in insmod or "not implemented" in insmod:
        module = "no (its kernel has no module support)"
    elif insmod:
        module = f"yes: the kernel's loader answered ({insmod.split(':')[-1].strip()})"
    else:
        module = "unknown"
    own_kernel = probes.get("kernel") == host["kernel"]
    lines = int(probes.get("dmesg_lines") or 0)
    if lines:
        dmesg = f"yes, {lines} lines of the host's log" if own_kernel else \
                f"its own kernel's log only ({lines} lines)"
    else:
        dmesg = f"no ({probes.get('dmesg_error') or 'empty'})"
    hidden = [m for m in host["mounts"] if m in seen_mounts]
    return {
        "kernel release": probes.get("kernel", "?") + (" (the host's)" if own_kernel else " (not the host's)"),
        "host PIDs visible": probes.get("host_pid", "?") + f" (sees {probes.get('processes', '?')} processes)",
        "host mounts visible": ("yes: " + ", ".join(hidden[:4])) if hidden else
                               f"no (sees {len(seen_mounts)} mounts)",
        "host network interfaces visible": ("yes: " + ", ".join(sorted(seen_net & set(host["netdevs"]))))
                                           if seen_net & set(host["netdevs"]) else
                                           "no (" + (", ".join(sorted(seen_net)) or "only lo") + ")",
        "/proc/cpuinfo": f"{probes.get('cpus', '?')} CPUs, {probes.get('cpu_model') or 'no model name'}",
        "/proc/meminfo": f"MemTotal {int(probes.get('mem_total_kb') or 0) // 1024} MiB",
        "can load a kernel module": module,
        "can read the host's dmesg": dmesg,
    }


def compare_bundle(opts, bundle: str, runs: int, out_dir: str, template_dir: str = "",
                   tree_files: int = TREE_FILES, tar_mb: int = TAR_MB) -> dict:
    """Measure every available runtime on ``bundle``; returns the results (also as JSON)."""
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    os.makedirs(out_dir, exist_ok=True)
    host = host_facts()
    work = tempfile.mkdtemp(prefix="runv-compare-")
    marker = f"runv-compare-{uuid.uuid4().hex[:8]}"
    sentinel = subprocess.Popen([marker, "3600"], executable=shutil.which("sleep"))
    results = {"bundle": os.path.abspath(bundle), "runs": runs, "host": host,
               "io": {"tree_files": tree_files, "tar_mb": tar_mb},
               "measures": {k: {"label": v[0], "unit": v[1], "better": v[2]}
                            for k, v in MEASURES.items()},
               "runtimes": {}, "skipped": {}}
    try:
        found, results["skipped"] = runtimes(opts, os.path.join(work, "state"), template_dir)
        reps = max(1, min(runs, 3))
        progress = Progress(len(found) * (runs * 2 + 3 + reps))
        for rt in found:
            tag = uuid.uuid4().hex[:6]
            data = {"measures": {}, "probes": {}}
            try:
                measure_runtime(rt, bundle, work, runs, reps, tag,
                                {"HOSTPID": sentinel.pid, "MARK": marker}, progress, data,
                                tree_files, tar_mb)
            except (CompareError, subprocess.TimeoutExpired, OSError) as e:
                data["error"] = str(e)
            data["isolation"] = judge_probes(data.get("probes") or {}, host)
            results["runtimes"][rt.name] = data
        progress.finish()
    finally:
        sentinel.kill()
        sentinel.wait()
        reap_orphans()
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump(results, f, indent=2)
    return results
