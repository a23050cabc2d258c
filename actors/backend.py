"""Where actors live: in this process (tests, debugging) or as Ray actors (the CLI default).

The engine only ever talks to a `Backend`: spawn a named actor from a plain class, call one of its
methods and get a future back, wait for futures, put a value once so several calls can share it,
kill and restart. Everything else in the pipeline is plain Python and runs the same on both.

Failures surface as two exception types whatever the backend:
  `ActorDiedError`  the actor process is gone (killed, crashed, OOM); restart it and retry.
  `ActorCallError`  the method itself raised; the message names the original exception.
"""
from __future__ import annotations

import itertools
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Sequence


class ActorDiedError(RuntimeError):
    """The actor serving a call is dead; its state is lost."""


class ActorCallError(RuntimeError):
    """An actor method raised; the actor itself is still alive.

    `reason` is the original exception's one-line message and `kind` its class name, so callers
    can show a user-facing error (a SourceError names the file and reason) without a traceback.
    """

    def __init__(self, message: str, reason: str = "", kind: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message
        self.kind = kind


@dataclass(frozen=True)
class ActorOptions:
    """Placement hints. CPU actors default to 0 scheduling CPUs so many small actors fit on a laptop."""

    num_cpus: float = 0.0
    num_gpus: float = 0.0
    # Environment for the actor's process (thread caps, mostly); ignored in-process.
    env: tuple[tuple[str, str], ...] = ()
    # Custom Ray resources the actor needs (e.g. {"masklet_tracker": 1} to keep a role on a node group).
    resources: tuple[tuple[str, float], ...] = ()
    # Spread actors of a pool over the cluster's nodes instead of packing them onto one.
    spread: bool = False
    # Run on the caller's node (a source reader opening a local file must see the caller's disk).
    same_node: bool = False
    # Calls served at once, each on its own thread (Ray's threaded actors); 1: one at a time, in order.
    max_concurrency: int = 1

    def __post_init__(self) -> None:
        if self.spread and self.same_node:
            raise ValueError("ActorOptions: spread and same_node exclude each other")


@dataclass
class ActorHandle:
    """A restartable reference to one actor; `generation` grows by one on every restart."""

    name: str
    cls: type
    args: tuple
    kwargs: dict
    options: ActorOptions
    impl: Any = None
    generation: int = 0


class Backend(ABC):
    @abstractmethod
    def spawn(self, name: str, cls: type, *args: Any, options: ActorOptions = ActorOptions(), **kwargs: Any) -> ActorHandle:
        ...

    @abstractmethod
    def call(self, actor: ActorHandle, method: str, *args: Any, num_returns: int = 1) -> Any:
        """Submit `actor.method(*args)`; returns a future, or a list of `num_returns` futures.

        Futures (and values from `put`) passed as top-level arguments are resolved before the
        method runs, as Ray does. Calls to one actor run in submission order.
        """

    @abstractmethod
    def wait(self, futures: Sequence[Any], timeout: float | None) -> tuple[list[Any], list[Any]]:
        """Split `futures` into (ready, pending), blocking up to `timeout` for at least one."""

    @abstractmethod
    def get(self, future: Any) -> Any:
        """The value of a finished future; raises ActorDiedError or ActorCallError."""

    @abstractmethod
    def put(self, value: Any) -> Any:
        """Store `value` once; the returned reference can be passed to many calls without copies."""

    @abstractmethod
    def kill(self, actor: ActorHandle) -> None:
        ...

    def restart(self, actor: ActorHandle, *args: Any, **kwargs: Any) -> ActorHandle:
        """Replace a (dead) actor by a fresh one with the same name; new constructor args optional."""
        self.kill(actor)
        actor.generation += 1
        if args or kwargs:
            actor.args, actor.kwargs = args, kwargs
        actor.impl = self._create(actor)
        return actor

    def spawn_handle(self, name: str, cls: type, args: tuple, kwargs: dict, options: ActorOptions) -> ActorHandle:
        actor = ActorHandle(name, cls, args, kwargs, options)
        actor.impl = self._create(actor)
        return actor

    @abstractmethod
    def _create(self, actor: ActorHandle) -> Any:
        ...

    def shutdown(self) -> None:
        """Release what this backend started (not a Ray session it did not start)."""

    @property
    def zero_copy_numpy(self) -> bool:
        """Whether numpy arrays passed through `put` are shared rather than copied per reader."""
        return False

    @property
    def separate_processes(self) -> bool:
        """Whether actors run in their own processes, where per-actor thread caps make sense."""
        return False


# ---------------------------------------------------------------------------------------------
# In-process: calls run synchronously at submission, futures are already resolved.


@dataclass(eq=False)  # hashable by identity, like a Ray ObjectRef
class LocalFuture:
    value: Any = None
    error: BaseException | None = None
    seq: int = 0


@dataclass(frozen=True)
class LocalRef:
    value: Any


@dataclass
class _LocalActor:
    instance: Any
    alive: bool = True


def retire_actor(backend: Backend, actor: ActorHandle) -> Any:
    """Read an actor's last stats snapshot (None if it is already dead), then kill it."""
    try:
        snapshot = backend.get(backend.call(actor, "stats_snapshot"))
    except (ActorDiedError, ActorCallError):
        snapshot = None
    backend.kill(actor)
    return snapshot


class InProcessBackend(Backend):
    """Runs every actor as an object in this process; `kill` makes later calls fail like a dead actor."""

    def __init__(self) -> None:
        self._seq = itertools.count()
        self.calls: list[tuple[str, str]] = []  # (actor name, method), for tests that check routing

    def spawn(self, name: str, cls: type, *args: Any, options: ActorOptions = ActorOptions(), **kwargs: Any) -> ActorHandle:
        return self.spawn_handle(name, cls, args, kwargs, options)

    def _create(self, actor: ActorHandle) -> _LocalActor:
        args = [self._resolve(a) for a in actor.args]
        kwargs = {k: self._resolve(v) for k, v in actor.kwargs.items()}
        return _LocalActor(actor.cls(*args, **kwargs))

    def call(self, actor: ActorHandle, method: str, *args: Any, num_returns: int = 1) -> Any:
        self.calls.append((actor.name, method))
        local: _LocalActor = actor.impl
        if not local.alive:
            futures = [LocalFuture(error=ActorDiedError(f"actor {actor.name} is dead"), seq=next(self._seq))
                       for _ in range(num_returns)]
            return futures[0] if num_returns == 1 else futures
        try:
            value = getattr(local.instance, method)(*[self._resolve(a) for a in args])
            error = None
        except ActorDiedError as exc:  # a stub simulating a crash from inside a call
            local.alive = False
            value, error = None, exc
        except Exception as exc:  # noqa: BLE001 - the caller decides what a failed call means
            value, error = None, ActorCallError(f"{actor.name}.{method}: {type(exc).__name__}: {exc}",
                                                first_line(exc), type(exc).__name__)
            error.__cause__ = exc
        if num_returns == 1:
            return LocalFuture(value, error, next(self._seq))
        values = list(value) if error is None else [None] * num_returns
        if error is None and len(values) != num_returns:
            error = ActorCallError(f"{actor.name}.{method} returned {len(values)} values, expected {num_returns}")
        return [LocalFuture(v, error, next(self._seq)) for v in values]

    def _resolve(self, arg: Any) -> Any:
        if isinstance(arg, LocalFuture):
            return self.get(arg)
        if isinstance(arg, LocalRef):
            return arg.value
        return arg

    def wait(self, futures: Sequence[Any], timeout: float | None) -> tuple[list[Any], list[Any]]:
        return list(futures), []

    def get(self, future: Any) -> Any:
        if isinstance(future, LocalRef):
            return future.value
        if future.error is not None:
            raise future.error
        return future.value

    def put(self, value: Any) -> Any:
        return LocalRef(value)

    def kill(self, actor: ActorHandle) -> None:
        if actor.impl is not None:
            actor.impl.alive = False


# ---------------------------------------------------------------------------------------------
# Ray: one named actor per handle; restarts are explicit so the engine decides what to replay.


def init_ray(**kwargs: Any) -> None:
    """`ray.init`, keeping a Ray session started by this process on loopback.

    Ray binds its servers (GCS, raylet, workers, agents) to the node IP, which on Linux defaults to the
    machine's outward address. For a single-node session Ray's own switch
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes the node IP 127.0.0.1, so nothing listens beyond the
    machine. Joining a cluster (an `address`, or RAY_ADDRESS) is left alone, and so is an explicit
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, for a head node that other machines will join.
    """
    import ray

    starts_own = kwargs.get("address") in (None, "local") and (kwargs.get("address") == "local"
                                                                or not os.environ.get("RAY_ADDRESS"))
    if starts_own:  # "local": a new session even when RAY_ADDRESS or a `ray start` cluster exists
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        try:  # the constant is read when ray is imported; ray may already be imported here
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("1", "true")
        except (ImportError, AttributeError):  # another Ray version: the environment variable still applies
            pass
    ray.init(**kwargs)


class RayBackend(Backend):
    """Ray actors. Starts a local Ray session when none is running (and stops it on shutdown)."""

    def __init__(self, namespace: str | None = None, init_kwargs: dict | None = None) -> None:
        import ray

        self._ray = ray
        self._started_ray = False
        if not ray.is_initialized():
            # Ray's own metrics (its agent's Prometheus export) have no reader in a session Masklet starts
            # without a dashboard, and collecting them cost ~5% of a 2-core machine in the null-model
            # pipeline; Masklet's metrics are its own (monitoring/).
            # Objects out of scope are freed in batches, by default once a second: until then every new
            # frame lands in object-store memory no process has touched yet, and each page faults
            # (~4.7 us each on this project's VM). Freeing every 100 ms lets new frames reuse freed
            # memory sooner: a decoder actor's first 240 frames of 720p took 815 -> 408 page faults and
            # 6.3-6.9 -> 4.4-6.3 ms of CPU per frame (a long run stops faulting either way, once it has
            # touched ~1 GB; a `segment` run of one clip never gets there).
            kwargs = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False,
                      "_system_config": {"enable_metrics_collection": False, "free_objects_period_milliseconds": 100}}
            kwargs.update(init_kwargs or {})
            init_ray(**kwargs)
            self._started_ray = True
        # A per-run prefix keeps actor names unique when several engines share one Ray session.
        self._prefix = namespace or f"masklet-{os.getpid()}-{time.monotonic_ns() % 10**9}"
        self._remote_classes: dict[type, Any] = {}
        self._spread_placed: dict[str, int] = {}  # node id -> spread actors this backend placed there

    @property
    def zero_copy_numpy(self) -> bool:
        return True

    @property
    def separate_processes(self) -> bool:
        return True

    def spawn(self, name: str, cls: type, *args: Any, options: ActorOptions = ActorOptions(), **kwargs: Any) -> ActorHandle:
        return self.spawn_handle(name, cls, args, kwargs, options)

    def _create(self, actor: ActorHandle) -> Any:
        remote_cls = self._remote_classes.get(actor.cls)
        if remote_cls is None:
            remote_cls = self._remote_classes[actor.cls] = self._ray.remote(actor.cls)
        opts: dict[str, Any] = {
            "name": f"{self._prefix}/{actor.name}#{actor.generation}",
            "num_cpus": actor.options.num_cpus,
            "num_gpus": actor.options.num_gpus,
            "max_restarts": 0,  # the engine restarts actors itself, with the state it chooses
            "max_task_retries": 0,
        }
        if actor.options.env:
            opts["runtime_env"] = {"env_vars": dict(actor.options.env)}
        if actor.options.resources:
            opts["resources"] = dict(actor.options.resources)
        if actor.options.max_concurrency > 1:
            opts["max_concurrency"] = actor.options.max_concurrency
        if actor.options.spread:
            opts["scheduling_strategy"] = self._spread_strategy(actor.options)
        elif actor.options.same_node:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = self._ray.get_runtime_context().get_node_id()
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=here, soft=False)
        return remote_cls.options(**opts).remote(*actor.args, **actor.kwargs)

    def _spread_strategy(self, options: ActorOptions) -> Any:
        """Pin the actor to the alive node (offering what it needs) that holds the fewest of this
        backend's spread actors. Ray's own "SPREAD" is a hint, and so is a soft node affinity:
        measured on a two-node loopback cluster, both put 3 or 4 of 4 zero-CPU actors on one node in
        most trials. A pinned actor whose node dies fails to start or dies; the executor restarts it
        and this picks again among the nodes still alive."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        needed = [(name, amount) for name, amount in options.resources if amount > 0]
        needed += [(kind, amount) for kind, amount in (("CPU", options.num_cpus), ("GPU", options.num_gpus)) if amount > 0]
        nodes = [n["NodeID"] for n in self._ray.nodes()
                 if n.get("Alive") and all(n.get("Resources", {}).get(name, 0) >= amount for name, amount in needed)]
        if not nodes:
            return "SPREAD"
        node = min(nodes, key=lambda n: (self._spread_placed.get(n, 0), n))
        self._spread_placed[node] = self._spread_placed.get(node, 0) + 1
        return NodeAffinitySchedulingStrategy(node_id=node, soft=False)

    def call(self, actor: ActorHandle, method: str, *args: Any, num_returns: int = 1) -> Any:
        bound = getattr(actor.impl, method)
        if num_returns != 1:
            bound = bound.options(num_returns=num_returns)
        return bound.remote(*args)

    def wait(self, futures: Sequence[Any], timeout: float | None) -> tuple[list[Any], list[Any]]:
        if not futures:
            return [], []
        ray = self._ray
        # fetch_local=False: the driver only needs to know a result exists, the value goes on by reference.
        ready, pending = ray.wait(list(futures), num_returns=1, timeout=timeout, fetch_local=False)
        if ready and pending:
            more, pending = ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=False)
            ready += more
        return ready, pending

    def get(self, future: Any) -> Any:
        try:
            return self._ray.get(future)
        except Exception as exc:  # noqa: BLE001 - every Ray failure becomes one of our two types
            raise ray_failure(self._ray, exc) from None

    def put(self, value: Any) -> Any:
        return self._ray.put(value)

    def kill(self, actor: ActorHandle) -> None:
        if actor.impl is not None:
            try:
                self._ray.kill(actor.impl, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                pass

    def shutdown(self) -> None:
        if self._started_ray and self._ray.is_initialized():
            self._ray.shutdown()


def ray_failure(ray: Any, exc: BaseException) -> Exception:
    """Map what `ray.get` raised to ActorDiedError or ActorCallError; every Ray failure is one of them.

    ActorCallError only when the actor's own method raised an ordinary exception: the actor is
    alive and its state intact. Everything else means the process, its node or its results are
    gone, and the caller recovers it like a SIGKILL (restart, replay): actor death, worker crash,
    OOM kill by Ray's memory monitor (OutOfMemoryError, not a RayActorError), node loss, raylet
    death, lost objects, and a MemoryError inside the method (its state may be half-updated).
    A non-Ray exception is a bug in the caller and passes through unchanged.
    """
    errors = ray.exceptions
    if isinstance(exc, errors.RayTaskError):
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        if isinstance(cause, (ActorDiedError, MemoryError)) or (
                isinstance(cause, errors.RayError) and not isinstance(cause, errors.RayTaskError)):
            return ActorDiedError(f"{type(cause).__name__}: {first_line(cause)}")
        return ActorCallError(f"{type(cause).__name__}: {first_line(cause)}", first_line(cause), type(cause).__name__)
    if isinstance(exc, errors.UnserializableException):
        return ActorCallError(first_line(exc), first_line(exc), "UnserializableException")
    if isinstance(exc, errors.RayError):  # RayActorError, OutOfMemoryError, NodeDiedError, WorkerCrashedError, ...
        return ActorDiedError(f"{type(exc).__name__}: {first_line(exc)}")
    return exc


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none): what users are shown."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

