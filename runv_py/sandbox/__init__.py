"""The sandbox API (one VM and the containers in it) that every entry point uses."""
from .container import VM_DIED_STATUS, Container, Exit, Process, ProcessIO
from .sandbox import Sandbox
from .share import private_mount_namespace
from .stats import ContainerStats
from .stdio import close_io

__all__ = ["Sandbox", "Container", "Process", "ProcessIO", "Exit", "ContainerStats",
           "VM_DIED_STATUS", "private_mount_namespace", "close_io"]
