"""libtorch's OpenMP threads, and a Python process as fast as the command line.

libgomp (the OpenMP runtime of PyTorch's libtorch) reads its wait policy once, when it is loaded
(by ``cpa_stream``'s native module or by ``import torch``, whichever comes first). By default an
idle OpenMP thread spins before it sleeps: the fastest on idle cores, but on cores shared with
other processes the spinning takes the time the step's other threads need (on this project's 2-core
machine with six busy processes, 4 epochs of the bundled data took 57 s spinning against 8 s
waiting passively). The command line watches the CPUs before it starts and runs itself again with
``OMP_WAIT_POLICY=PASSIVE`` when they are busy. A Python process cannot run itself again, so:

- imported before torch, ``cpa_stream`` watches the CPUs for 0.2 s and sets
  ``OMP_WAIT_POLICY=PASSIVE`` when they are busy, before its native module loads libtorch;
- each training, prediction to a file, evaluation and dose-response then checks the CPUs again;
  when the policy torch loaded with does not suit them (torch was imported first on a busy
  machine, or the machine was busy at import and is idle now), the work runs in a child Python
  process that loads torch with the suitable policy, its progress and errors relayed here.

Nothing of this happens when the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``, and
``CPA_STREAM_ISOLATE=0`` (never) or ``1`` (always) decides instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

#: CPUs busy with other processes from which the machine counts as shared (as the CLI's).
BUSY = 0.5
#: How long the CPUs are watched.
SAMPLE = 0.2

#: How long a measurement of the busy CPUs is reused (a call right after the import takes the
#: import's instead of watching again).
REUSE = 1.0
#: The variable through which the Rust thread plan takes a measurement instead of watching itself
#: (``cpa_stream_pipeline::threads::BUSY_CPUS_VAR``, which the CLI sets the same way).
BUSY_VAR = "CPA_STREAM_BUSY_CPUS"

_USER_SET = any(name in os.environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
#: The last measurement: (``time.monotonic()``, CPUs busy elsewhere).
_MEASURED: tuple[float, float] | None = None
_PASSIVE = os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive"


def _cpu_ticks() -> tuple[int, int]:
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:9]]
    return sum(values), values[3] + values[4]


def busy_elsewhere(sample: float = SAMPLE) -> float:
    """CPUs kept busy by other processes over ``sample`` seconds (0 where it cannot be told)."""
    try:
        total0, idle0 = _cpu_ticks()
        own0 = os.times()
        time.sleep(sample)
        total1, idle1 = _cpu_ticks()
        own1 = os.times()
    except OSError:
        return 0.0
    ticks = total1 - total0
    if ticks <= 0:
        return 0.0
    hz = os.sysconf("SC_CLK_TCK")
    own = (own1.user - own0.user + own1.system - own0.system) * hz
    cpus = os.cpu_count() or 1
    return max(0.0, (ticks - (idle1 - idle0) - own) / ticks * cpus)


def prepare(meanwhile: Callable[[], object] | None = None) -> None:
    """Before libtorch is loaded: wait passively when the CPUs are busy; and keep numba (scanpy's
    kernels) off a second OpenMP runtime (:func:`keep_numba_off_openmp`). ``meanwhile`` (the
    package's other imports) runs while the CPUs are watched, so the watch adds no time of its own
    (this process's own CPU time is not counted as busy)."""
    global _PASSIVE
    keep_numba_off_openmp()
    if _USER_SET:
        if meanwhile is not None:
            meanwhile()
        return
    busy: list[float] = []
    watch = threading.Thread(target=lambda: busy.append(busy_elsewhere()), name="cpa-stream-cpu-watch", daemon=True)
    watch.start()
    try:
        if meanwhile is not None:
            meanwhile()
    finally:
        watch.join()
    if busy:
        _remember(busy[0])
    # torch imported first has loaded libtorch's runtime with its policy already: the measurement
    # only serves the first call (which then need not watch again).
    if busy and busy[0] >= BUSY and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        _PASSIVE = True


def _remember(busy: float) -> None:
    global _MEASURED
    _MEASURED = (time.monotonic(), busy)


def _fresh() -> float | None:
    """The CPUs busy elsewhere as measured within the last :data:`REUSE` seconds, if they were."""
    if _MEASURED is not None and time.monotonic() - _MEASURED[0] < REUSE:
        return _MEASURED[1]
    return None


def busy_now() -> float:
    """The CPUs busy elsewhere: the last measurement when fresh, else watched now."""
    busy = _fresh()
    if busy is None:
        busy = busy_elsewhere()
        _remember(busy)
    return busy


def keep_numba_off_openmp() -> None:
    """numba's parallel kernels (scanpy's, among others) pick the ``omp`` threading layer when
    TBB is absent, which loads the system's libgomp beside the one libtorch ships. With both in
    the process, libtorch's parallel loops run from a thread other than the main one (where
    cpa-stream worked until 2026-11-30; it now works on the calling thread) do about twice the
    work: measured on this project's 2-core
    machine, 40 epochs of a small model 11.0 s after one numba ``prange`` call against 5.9 s
    without, the same with ``torch`` ops alone on a Python thread (1.73 s against 0.88 s). Unless
    the user chose a layer (``NUMBA_THREADING_LAYER``), numba is pointed at its own ``workqueue``
    layer, which uses no OpenMP runtime. scikit-learn brings a libgomp of its own too (its
    ``KMeans``, for one, uses it: the same slowdown after one fit); where a second runtime is
    loaded, :func:`should_isolate` moves multi-threaded work to a child process (about 1.4 s of
    start-up, against the doubled time of every step)."""
    if "NUMBA_THREADING_LAYER" in os.environ:
        return
    numba = sys.modules.get("numba")
    if numba is None:
        os.environ["NUMBA_THREADING_LAYER"] = "workqueue"
        return
    config = getattr(numba, "config", None)
    if config is not None and getattr(config, "THREADING_LAYER", "default") == "default":
        # numba was imported but reads its layer when its first parallel kernel runs.
        config.THREADING_LAYER = "workqueue"


#: Files of OpenMP runtimes other than the libgomp libtorch brings (a process that has one of these
#: mapped runs libtorch's parallel loops slowly, :func:`keep_numba_off_openmp`).
_OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp.so")


def foreign_openmp() -> str | None:
    """The path of an OpenMP runtime mapped in this process besides libtorch's own, or ``None``."""
    found: list[str] = []
    libtorch: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(None, 5)[-1] if line.count(" ") >= 5 else ""
                name = os.path.basename(path)
                if any(name.startswith(r) for r in _OPENMP_RUNTIMES) and path not in found:
                    found.append(path)
                elif name == "libtorch_cpu.so" and path not in libtorch:
                    libtorch.append(path)
    except OSError:
        return None
    # libtorch's own runtime sits beside libtorch_cpu.so (torch/lib), whether the native module
    # or torch loaded it.
    torch_lib = next((os.path.dirname(p) for p in libtorch if os.path.basename(p) == "libtorch_cpu.so"), None)
    for path in found:
        if torch_lib is None or not path.startswith(torch_lib + os.sep):
            return path
    return None


def compute(command: str, request: str, progress: object | None) -> str:
    """``_native.run`` of work on libtorch's threads, in this process or, when the wait policy
    torch loaded with does not suit the CPUs now, in a child process (a GPU run never moves)."""
    from . import _native

    # A GPU run, and a rank of data-parallel training (its process group lives here), never move.
    if '"cuda' not in request and not _in_group(request) and should_isolate(_threads_of(request)):
        return run(command, request, progress)
    # The thread plan takes the measurement just made instead of watching the CPUs again.
    busy = _fresh()
    if busy is None or BUSY_VAR in os.environ:
        return _native.run(command, request, progress)
    os.environ[BUSY_VAR] = f"{busy:.2f}"
    try:
        return _native.run(command, request, progress)
    finally:
        os.environ.pop(BUSY_VAR, None)


def _in_group(request: str) -> bool:
    """Whether a request trains as a rank of a process group of this process."""
    try:
        return json.loads(request).get("process_group") is not None
    except (ValueError, AttributeError):
        return False


def _threads_of(request: str) -> int | None:
    """The libtorch threads a request asks for (``None``: planned)."""
    try:
        compute = json.loads(request).get("compute") or {}
    except (ValueError, AttributeError):
        return None
    threads = compute.get("threads") if isinstance(compute, dict) else None
    return threads if isinstance(threads, int) else None


def should_isolate(threads: int | None = None) -> bool:
    """Whether work on libtorch's CPU threads (``threads``; ``None``: planned) should run in a
    child process now: the wait policy torch loaded with does not suit the CPUs, or another
    OpenMP runtime is loaded here and libtorch would run parallel loops (more than one thread)."""
    forced = os.environ.get("CPA_STREAM_ISOLATE")
    if forced in ("0", "1"):
        return forced == "1"
    if threads != 1 and (os.cpu_count() or 1) > 1 and foreign_openmp() is not None:
        return True
    if _USER_SET:
        return False
    return (busy_now() >= BUSY) != _PASSIVE


class _Relay:
    """The progress object of the child: events as lines on standard output."""

    def __init__(self, out: Any) -> None:
        self.out = out

    def _send(self, *event: Any) -> None:
        self.out.write("EVENT " + json.dumps(event) + "\n")
        self.out.flush()

    def begin(self, phase: str, total: int) -> None:
        self._send("begin", phase, total)

    def epochs(self, cells_per_epoch: int, resumed: int, first: int, last: int) -> None:
        self._send("epochs", cells_per_epoch, resumed, first, last)

    def advance(self, n: int) -> None:
        self._send("advance", n)

    def note(self, text: str) -> None:
        self._send("note", text)

    def end(self) -> None:
        self._send("end")


#: The child's program: this package's native module and this module, without the package's own
#: imports (numpy, pandas, pyarrow: a second of a busy machine's time that the work does not use).
_CHILD = """
import importlib.util, sys, types
spec = importlib.util.find_spec("cpa_stream")
package = types.ModuleType("cpa_stream")
package.__path__ = list(spec.submodule_search_locations)
sys.modules["cpa_stream"] = package
from cpa_stream import _openmp
_openmp._child()
"""


def run(command: str, request: str, progress: object | None) -> str:
    """``_native.run(command, request, progress)`` in a child Python process that loads torch
    with the wait policy the CPUs call for now; the same result, errors raised as themselves."""
    env = dict(os.environ)
    busy = busy_now()
    if not _USER_SET:
        # The policy the CPUs call for now, read by the child's libtorch when it loads (the child
        # does not run this package's import, which would watch them again).
        if busy >= BUSY:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        else:
            env.pop("OMP_WAIT_POLICY", None)
    env.setdefault(BUSY_VAR, f"{busy:.2f}")
    env["CPA_STREAM_ISOLATE"] = "0"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )

    def relay_stderr() -> None:
        for line in child.stderr:
            sys.stderr.write(line)

    thread = threading.Thread(target=relay_stderr, daemon=True)
    thread.start()
    child.stdin.write(json.dumps({"command": command, "request": request, "progress": progress is not None}))
    child.stdin.close()
    result = None
    try:
        for line in child.stdout:
            if line.startswith("EVENT ") and progress is not None:
                name, *args = json.loads(line[6:])
                getattr(progress, name)(*args)
            elif line.startswith("RESULT "):
                result = json.loads(line[7:])
        child.wait()
    except KeyboardInterrupt:
        child.send_signal(2)
        child.wait()
        raise
    thread.join(timeout=5)
    if result is None:
        raise RuntimeError(f"{command}: the child process ended with status {child.returncode} and no result")
    if "error" in result:
        raise _error(result["type"], result["error"])
    return result["ok"]


def _error(kind: str, message: str) -> BaseException:
    import builtins

    from ._native import CpaStreamError

    known = {"CpaStreamError": CpaStreamError, "KeyboardInterrupt": KeyboardInterrupt}
    cls = known.get(kind) or getattr(builtins, kind, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        cls = RuntimeError
    return cls(message)


def _child() -> None:
    job = json.loads(sys.stdin.read())
    out = sys.stdout
    from . import _native

    try:
        relay = _Relay(out) if job["progress"] else None
        answer = {"ok": _native.run(job["command"], job["request"], relay)}
    except BaseException as e:  # noqa: BLE001 - relayed to the parent, which raises it
        answer = {"error": str(e), "type": type(e).__name__}
    out.write("RESULT " + json.dumps(answer) + "\n")
    out.flush()
