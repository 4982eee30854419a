"""CriClient: typed helpers over the CRI v1 RuntimeService and ImageService (the
subset in api.proto), as kubelet would call them."""
import contextlib
import json
import os
import time
import uuid
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import grpc

from . import api_pb2 as pb
from . import api_pb2_grpc as pb_grpc


class ExecSyncTimeout(Exception):
    """ExecSync's command outlived its timeout (containerd killed it)."""

    def __init__(self, error: grpc.RpcError):
        super().__init__(f"{error.code()}: {error.details()}")
        self.error = error


def _resources(value) -> Optional[pb.LinuxContainerResources]:
    """LinuxContainerResources from None, a message or a dict of its fields
    (cpu_period, cpu_quota, cpu_shares, memory_limit_in_bytes, cpuset_cpus, ...)."""
    if value is None or isinstance(value, pb.LinuxContainerResources):
        return value
    return pb.LinuxContainerResources(**value)


def _namespace_options(value) -> Optional[pb.NamespaceOption]:
    """NamespaceOption from None, a message or a dict like
    ``{"network": "NODE", "pid": "CONTAINER", "ipc": "POD"}`` (names or enum values)."""
    if value is None or isinstance(value, pb.NamespaceOption):
        return value
    fields = {k: (pb.NamespaceMode.Value(v) if isinstance(v, str) else v)
              for k, v in value.items()}
    return pb.NamespaceOption(**fields)


# What kubelet asks for a pod without hostNetwork/hostPID/hostIPC or a shared process
# namespace: the pod's network and IPC namespaces, a PID namespace per container.
KUBELET_NAMESPACES = {"network": "POD", "pid": "CONTAINER", "ipc": "POD"}


class CriClient:
    """Typed helpers over the CRI v1 RuntimeService and ImageService.

    ``default_cgroup_parent`` and ``default_handler`` apply to pods that do not name
    their own. Every pod and container created through this client is remembered;
    ``cleanup()`` stops and removes them (in the order kubelet would).
    """

    def __init__(self, address: str, default_cgroup_parent: str = "",
                 default_handler: str = "", rpc_timeout: float = 120):
        target = address if address.startswith("unix:") else "unix://" + address
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 32 << 20)])
        self.runtime = pb_grpc.RuntimeServiceStub(self.channel)
        self.images = pb_grpc.ImageServiceStub(self.channel)
        self.default_cgroup_parent = default_cgroup_parent
        self.default_handler = default_handler
        self.rpc_timeout = rpc_timeout
        self.pods: Dict[str, pb.PodSandboxConfig] = {}  # id -> the config it ran with
        self.containers: Dict[str, str] = {}  # container id -> pod id

    def close(self) -> None:
        self.channel.close()

    # Runtime

    def version(self) -> pb.VersionResponse:
        return self.runtime.Version(pb.VersionRequest(version="v1"), timeout=self.rpc_timeout)

    def status(self, verbose: bool = False) -> pb.StatusResponse:
        return self.runtime.Status(pb.StatusRequest(verbose=verbose), timeout=self.rpc_timeout)

    def conditions(self) -> Dict[str, bool]:
        """{"RuntimeReady": bool, "NetworkReady": bool}"""
        return {c.type: c.status for c in self.status().status.conditions}

    # Pods

    def pod_config(self, name: str, uid: str = None, namespace: str = "default",
                   hostname: str = None, log_dir: str = "", annotations: dict = None,
                   labels: dict = None, cgroup_parent: str = None, resources=None,
                   overhead=None, namespace_options=None, privileged: bool = False,
                   sysctls: dict = None, dns_servers: Sequence[str] = ("127.0.0.1",),
                   dns_searches: Sequence[str] = (), dns_options: Sequence[str] = (),
                   port_mappings: Iterable[pb.PortMapping] = (),
                   attempt: int = 0) -> pb.PodSandboxConfig:
        """A PodSandboxConfig as kubelet builds it. Namespaces default to kubelet's
        (pod network and IPC, a PID namespace per container). The DNS server defaults
        to 127.0.0.1: with no dns_config containerd copies the host's resolv.conf, and
        nothing in a test pod may talk to the host's name servers."""
        if namespace_options is None:
            namespace_options = KUBELET_NAMESPACES
        security = pb.LinuxSandboxSecurityContext(
            namespace_options=_namespace_options(namespace_options), privileged=privileged)
        linux = pb.LinuxPodSandboxConfig(
            cgroup_parent=self.default_cgroup_parent if cgroup_parent is None else cgroup_parent,
            security_context=security, sysctls=sysctls or {},
            overhead=_resources(overhead), resources=_resources(resources))
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid or uuid.uuid4().hex,
                                           namespace=namespace, attempt=attempt),
            hostname=name if hostname is None else hostname,
            log_directory=log_dir,
            dns_config=pb.DNSConfig(servers=list(dns_servers), searches=list(dns_searches),
                                    options=list(dns_options)),
            port_mappings=list(port_mappings),
            labels=labels or {}, annotations=annotations or {}, linux=linux)

    def run_pod(self, name: str, uid: str = None, namespace: str = "default",
                hostname: str = None, log_dir: str = "", annotations: dict = None,
                handler: str = None, config: pb.PodSandboxConfig = None, **kw) -> str:
        """RunPodSandbox; returns the pod's id. ``kw``: see ``pod_config`` (labels,
        cgroup_parent, resources, overhead, namespace_options, privileged, sysctls,
        dns_servers, port_mappings). ``log_dir`` is created if missing."""
        if config is None:
            config = self.pod_config(name, uid, namespace, hostname, log_dir, annotations, **kw)
        if config.log_directory:
            os.makedirs(config.log_directory, exist_ok=True)
        handler = self.default_handler if handler is None else handler
        pod_id = self.runtime.RunPodSandbox(
            pb.RunPodSandboxRequest(config=config, runtime_handler=handler),
            timeout=self.rpc_timeout).pod_sandbox_id
        self.pods[pod_id] = config
        return pod_id

    def pod_status(self, pod_id: str, verbose: bool = False) -> pb.PodSandboxStatusResponse:
        """The whole response: ``.status`` (state, network.ip, ...) and, when verbose,
        ``.info["info"]`` (containerd's JSON: pid, netNamespacePath, runtimeSpec...)."""
        return self.runtime.PodSandboxStatus(
            pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=verbose),
            timeout=self.rpc_timeout)

    def pod_info(self, pod_id: str) -> dict:
        """containerd's verbose sandbox info (JSON)."""
        return json.loads(self.pod_status(pod_id, verbose=True).info.get("info", "{}"))

    def pod_ip(self, pod_id: str) -> str:
        return self.pod_status(pod_id).status.network.ip

    def list_pods(self, pod_id: str = "", state: int = None,
                  labels: dict = None) -> List[pb.PodSandbox]:
        flt = pb.PodSandboxFilter(id=pod_id, label_selector=labels or {})
        if state is not None:
            flt.state.state = state
        return list(self.runtime.ListPodSandbox(pb.ListPodSandboxRequest(filter=flt),
                                                timeout=self.rpc_timeout).items)

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                    timeout=self.rpc_timeout)

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                      timeout=self.rpc_timeout)
        self.pods.pop(pod_id, None)
        for cid in [c for c, p in self.containers.items() if p == pod_id]:
            del self.containers[cid]

    # Containers

    def container_config(self, name: str, image: str, command: Sequence[str] = (),
                         args: Sequence[str] = (), working_dir: str = "",
                         env: dict = None, mounts: Iterable[pb.Mount] = (),
                         labels: dict = None, annotations: dict = None,
                         log_path: str = "", stdin: bool = False, stdin_once: bool = False,
                         tty: bool = False, resources=None,
                         security_context: pb.LinuxContainerSecurityContext = None,
                         namespace_options=None, attempt: int = 0) -> pb.ContainerConfig:
        security = security_context or pb.LinuxContainerSecurityContext()
        if namespace_options is not None:
            security.namespace_options.CopyFrom(_namespace_options(namespace_options))
        return pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=attempt),
            image=pb.ImageSpec(image=image), command=list(command), args=list(args),
            working_dir=working_dir,
            envs=[pb.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            mounts=list(mounts), labels=labels or {}, annotations=annotations or {},
            log_path=log_path, stdin=stdin, stdin_once=stdin_once, tty=tty,
            linux=pb.LinuxContainerConfig(resources=_resources(resources),
                                          security_context=security))

    def create_container(self, pod_id: str, name: str, image: str, command: Sequence[str] = (),
                         args: Sequence[str] = (), pod_config: pb.PodSandboxConfig = None,
                         config: pb.ContainerConfig = None, log_path: str = None,
                         **kw) -> str:
        """CreateContainer; returns its id. ``log_path`` is relative to the pod's
        log directory (default ``<name>/<attempt>.log`` when the pod has one); its
        directory is created as kubelet would. ``kw``: see ``container_config``
        (working_dir, env, mounts, labels, annotations, stdin, stdin_once, tty,
        resources, security_context, namespace_options)."""
        pod_config = pod_config or self.pods[pod_id]
        if config is None:
            if log_path is None:
                log_path = f"{name}/{kw.get('attempt', 0)}.log" if pod_config.log_directory else ""
            config = self.container_config(name, image, command, args, log_path=log_path, **kw)
            security = config.linux.security_context
            if not security.HasField("namespace_options"):
                # kubelet gives containers the namespace options of their pod.
                security.namespace_options.CopyFrom(
                    pod_config.linux.security_context.namespace_options)
        if config.log_path and pod_config.log_directory:
            path = os.path.join(pod_config.log_directory, config.log_path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
        cid = self.runtime.CreateContainer(
            pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config,
                                      sandbox_config=pod_config),
            timeout=self.rpc_timeout).container_id
        self.containers[cid] = pod_id
        return cid

    def run_container(self, pod_id: str, name: str, image: str, command: Sequence[str] = (),
                      args: Sequence[str] = (), **kw) -> str:
        """CreateContainer + StartContainer."""
        cid = self.create_container(pod_id, name, image, command, args, **kw)
        self.start_container(cid)
        return cid

    def start_container(self, cid: str) -> None:
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=cid),
                                    timeout=self.rpc_timeout)

    def stop_container(self, cid: str, timeout: int = 0) -> None:
        """StopContainer: the stop signal, then SIGKILL after ``timeout`` seconds."""
        self.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=timeout),
                                   timeout=self.rpc_timeout + timeout)

    def remove_container(self, cid: str) -> None:
        self.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid),
                                     timeout=self.rpc_timeout)
        self.containers.pop(cid, None)

    def container_status(self, cid: str) -> pb.ContainerStatus:
        return self.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid),
                                            timeout=self.rpc_timeout).status

    def container_info(self, cid: str) -> dict:
        """containerd's verbose container info (JSON: pid, runtimeSpec, snapshotKey...)."""
        response = self.runtime.ContainerStatus(
            pb.ContainerStatusRequest(container_id=cid, verbose=True), timeout=self.rpc_timeout)
        return json.loads(response.info.get("info", "{}"))

    def wait_container(self, cid: str, state: int = pb.CONTAINER_EXITED,
                       timeout: float = 60) -> pb.ContainerStatus:
        deadline = time.monotonic() + timeout
        while True:
            status = self.container_status(cid)
            if status.state == state:
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"container {cid} is {pb.ContainerState.Name(status.state)}"
                                     f" after {timeout}s, not {pb.ContainerState.Name(state)}")
            time.sleep(0.1)

    def list_containers(self, pod_id: str = "", state: int = None, cid: str = "",
                        labels: dict = None) -> List[pb.Container]:
        flt = pb.ContainerFilter(id=cid, pod_sandbox_id=pod_id, label_selector=labels or {})
        if state is not None:
            flt.state.state = state
        return list(self.runtime.ListContainers(pb.ListContainersRequest(filter=flt),
                                                timeout=self.rpc_timeout).containers)

    def exec_sync(self, cid: str, cmd: Sequence[str], timeout: int = 0) -> Tuple[int, bytes, bytes]:
        """ExecSync -> (exit code, stdout, stderr). A command that outlives ``timeout``
        seconds (0: no limit) raises ExecSyncTimeout."""
        try:
            r = self.runtime.ExecSync(
                pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=timeout),
                timeout=self.rpc_timeout + timeout)
        except grpc.RpcError as e:
            if timeout and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise ExecSyncTimeout(e) from None
            raise
        return r.exit_code, r.stdout, r.stderr

    # Streaming: each returns a URL on containerd's streaming server (cri/streaming.py)

    def exec_url(self, cid: str, cmd: Sequence[str], tty: bool = False, stdin: bool = False,
                 stdout: bool = True, stderr: bool = None) -> str:
        """Exec: the URL of a streaming exec. ``stderr`` defaults to ``not tty`` (a
        terminal merges it into stdout: CRI refuses both)."""
        stderr = not tty if stderr is None else stderr
        return self.runtime.Exec(pb.ExecRequest(container_id=cid, cmd=list(cmd), tty=tty,
                                                stdin=stdin, stdout=stdout, stderr=stderr),
                                 timeout=self.rpc_timeout).url

    def attach_url(self, cid: str, tty: bool = False, stdin: bool = False,
                   stdout: bool = True, stderr: bool = None) -> str:
        """Attach: the URL of a streaming attach to the container's own stdio (``tty``
        must match the container's config)."""
        stderr = not tty if stderr is None else stderr
        return self.runtime.Attach(pb.AttachRequest(container_id=cid, tty=tty, stdin=stdin,
                                                    stdout=stdout, stderr=stderr),
                                   timeout=self.rpc_timeout).url

    def port_forward_url(self, pod_id: str, ports: Sequence[int] = ()) -> str:
        """PortForward: the URL of a port-forward stream into the pod (the ports are
        named again by the WebSocket client, as ``?port=`` parameters)."""
        return self.runtime.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod_id,
                                                              port=list(ports)),
                                        timeout=self.rpc_timeout).url

    def container_stats(self, cid: str) -> pb.ContainerStats:
        return self.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid),
                                           timeout=self.rpc_timeout).stats

    def list_container_stats(self, pod_id: str = "") -> List[pb.ContainerStats]:
        flt = pb.ContainerStatsFilter(pod_sandbox_id=pod_id)
        return list(self.runtime.ListContainerStats(pb.ListContainerStatsRequest(filter=flt),
                                                    timeout=self.rpc_timeout).stats)

    def update_container_resources(self, cid: str, resources) -> None:
        self.runtime.UpdateContainerResources(
            pb.UpdateContainerResourcesRequest(container_id=cid, linux=_resources(resources)),
            timeout=self.rpc_timeout)

    # Images

    def list_images(self) -> List[pb.Image]:
        return list(self.images.ListImages(pb.ListImagesRequest(),
                                           timeout=self.rpc_timeout).images)

    def image_status(self, image: str) -> Optional[pb.Image]:
        r = self.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image)),
                                    timeout=self.rpc_timeout)
        return r.image if r.HasField("image") else None

    # Clean-up

    def cleanup(self, every_pod: bool = False) -> List[str]:
        """Stop and remove this client's pods and containers (``every_pod``: every
        pod and container CRI knows of). Returns the errors met; never raises."""
        errors = []
        pods = set(self.pods)
        cids = set(self.containers)
        if every_pod:
            with contextlib.suppress(grpc.RpcError):
                pods |= {p.id for p in self.list_pods()}
                cids |= {c.id for c in self.list_containers()}
        for cid in sorted(cids):
            for step in (lambda: self.stop_container(cid, 0), lambda: self.remove_container(cid)):
                try:
                    step()
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        errors.append(f"container {cid}: {e.code()} {e.details()}")
        for pod_id in sorted(pods):
            for step in (lambda: self.stop_pod(pod_id), lambda: self.remove_pod(pod_id)):
                try:
                    step()
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        errors.append(f"pod {pod_id}: {e.code()} {e.details()}")
            self.pods.pop(pod_id, None)
        self.containers.clear()
        return errors
