"""Launching VMs from any thread without tying their lives to that thread.

QEMU dies with the *thread* that forked it (its parent-death signal follows the forking
thread), so a short-lived thread (a cache's refill, a request handler) must not be its
parent: such launches go to one thread that lives as long as the process.
"""
import queue
import threading

# A launch is a Popen and its checks (QEMU's sockets, the agent's channels); launches
# queue behind each other, so this leaves room for a few.
LAUNCH_TIMEOUT = 120.0


class Launcher:
    """One thread, alive as long as the process, that spawns every QEMU a background
    thread asks for: QEMU dies with the *thread* that forked it (PR_SET_PDEATHSIG), so a
    cache's refill thread (or any short-lived thread) must not be its parent."""

    _instance = None
    _guard = threading.Lock()

    def __init__(self):
        self.requests = queue.Queue()
        threading.Thread(target=self._serve, name="qemu-launcher", daemon=True).start()

    @classmethod
    def get(cls) -> "Launcher":
        with cls._guard:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _serve(self) -> None:
        while True:
            fn, args, kwargs, request = self.requests.get()
            try:
                outcome = (True, fn(*args, **kwargs))
            except BaseException as e:  # handed back to the caller
                outcome = (False, e)
            with request["lock"]:
                request["result"] = outcome
                abandoned = request["abandoned"]
                request["done"].set()
            if abandoned and outcome[0] and hasattr(outcome[1], "stop"):
                outcome[1].stop()  # the caller gave up on it: nobody else would stop it

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the launcher thread; Unavailable if it has not
        returned within LAUNCH_TIMEOUT (a VM it returns later is stopped)."""
        from ..hyperstart.errors import Unavailable
        timeout = LAUNCH_TIMEOUT
        request = {"lock": threading.Lock(), "done": threading.Event(), "result": None,
                   "abandoned": False}
        self.requests.put((fn, args, kwargs, request))
        request["done"].wait(timeout)
        with request["lock"]:
            if request["result"] is None:
                request["abandoned"] = True
                raise Unavailable(f"the VM launcher did not return within {timeout:g} s")
            ok, value = request["result"]
        if not ok:
            raise value
        return value


class SafeLaunch:
    """A driver whose launch() from any thread but the main one runs on the launcher
    thread, so that the QEMU outlives the thread that asked for it."""

    def __init__(self, driver):
        self._driver = driver
        self.observers = {}       # thread id -> callable(vm), told of the VMs it launches

    def __getattr__(self, name):
        return getattr(self._driver, name)

    def launch(self, *args, **kwargs):
        if threading.current_thread() is threading.main_thread():
            vm = self._driver.launch(*args, **kwargs)
        else:
            vm = Launcher.get().call(self._driver.launch, *args, **kwargs)
        observer = self.observers.get(threading.get_ident())
        if observer is not None:
            observer(vm)
        return vm


def safe(driver) -> SafeLaunch:
    """``driver`` wrapped so that its VMs outlive the threads that ask for them."""
    return driver if isinstance(driver, SafeLaunch) else SafeLaunch(driver)
