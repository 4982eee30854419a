"""Task events for containerd: Envelopes sent to
``containerd.services.events.ttrpc.v1.Events/Forward`` on TTRPC_ADDRESS.

One thread sends them, so they arrive in the order they happened; a containerd that is
away (restarting) is retried for a while, then the event is dropped and logged.
"""
import logging
import queue
import threading
import time

from .. import ttrpc
from .pb import shimv2_pb2 as pb

log = logging.getLogger("runv_py.shimv2.events")

FORWARD = ("containerd.services.events.ttrpc.v1.Events", "Forward")
RETRY_FOR = 30.0


class Publisher:
    def __init__(self, address: str, namespace: str):
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self.queue: "queue.Queue" = queue.Queue()
        self.client = None
        self.idle = threading.Event()
        self.idle.set()
        threading.Thread(target=self.run, name="events", daemon=True).start()

    def publish(self, topic: str, event) -> None:
        envelope = pb.Envelope(namespace=self.namespace, topic=topic)
        envelope.timestamp.GetCurrentTime()
        # containerd resolves events by their proto name (typeurl without a prefix).
        envelope.event.type_url = "containerd.events." + type(event).DESCRIPTOR.name
        envelope.event.value = event.SerializeToString()
        self.idle.clear()
        self.queue.put(pb.ForwardRequest(envelope=envelope).SerializeToString())
        log.info("event %s", topic)

    def drain(self, timeout: float) -> None:
        """Wait (bounded) until queued events are sent, before the daemon exits."""
        self.idle.wait(timeout)

    def run(self) -> None:
        while True:
            payload = self.queue.get()
            deadline = time.monotonic() + RETRY_FOR
            while True:
                try:
                    self.send(payload)
                    break
                except (OSError, ConnectionError, ttrpc.TtrpcError) as e:
                    self.close()
                    if time.monotonic() > deadline or not self.address:
                        log.warning("event dropped: %s", e)
                        break
                    time.sleep(0.5)
            if self.queue.empty():
                self.idle.set()

    def send(self, payload: bytes) -> None:
        if self.client is None:
            self.client = ttrpc.Client(self.address, timeout=10.0)
        self.client.call(*FORWARD, payload, timeout=10.0)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
