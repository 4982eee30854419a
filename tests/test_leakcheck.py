"""The suite's mount-leak check looks where a leak would be: a mount made in a private
mount namespace (as every shim makes its mounts) is invisible in this process's own
mount table, and found while any process keeps that namespace alive."""
import os
import subprocess

from conftest import mounts_under


def test_a_mount_planted_in_a_private_namespace_is_found(tmp_path):
    root = str(tmp_path / "state")
    target = os.path.join(root, "c-planted", "share")
    os.makedirs(target)
    holder = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs planted {target} && echo ready && exec sleep 60"],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert holder.stdout.readline() == b"ready\n"
        with open("/proc/self/mountinfo") as f:
            assert not [line for line in f if root in line]  # what the old check read
        found = mounts_under(root)
        assert len(found) == 1 and f" {target} " in found[0] and \
            found[0].startswith(f"{holder.pid}: "), found
        assert mounts_under(str(tmp_path / "stat")) == []  # a prefix is not a parent
    finally:
        holder.kill()
        holder.wait()
    assert mounts_under(root) == []  # the namespace went with its last process
