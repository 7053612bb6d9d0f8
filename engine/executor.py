"""Where the units of a job run: in this process, or on the actors of a Ray cluster.

The engines cut their work into units (an attribution batch of rows; the planned patched forwards
of one bucket, in chunks) and describe a stage by a module-level function ``build(model, *args)``
returning ``compute(unit) -> part``. :meth:`Local.map` runs ``compute`` here, unit after
unit. :class:`Ray` starts one actor per GPU (per CPU slot without GPUs); each keeps the model and,
per stage, what ``build`` prepared (the clean cache of a bucket) and pulls units as it finishes
them. Parts come back in any order; the engine merges them in unit order
(:func:`causalscan.checkpoint.run`), so a Ray run gives the single-process result: bitwise on CPU
with the same thread count per actor as the single process (``threads``), to float tolerance on
GPU. An actor killed mid-run is restarted by Ray and its unfinished units re-run.

>>> list(Local().map(None, _square_stage, (), [1, 2, 3]))
[(0, 1), (1, 4), (2, 9)]
"""

from __future__ import annotations

import os
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence

import torch

from causalscan.errors import InputError, check_options

ENV = ("TRITON_INTERPRET", "CAUSALSCAN_BACKEND")  # what decides the backend: the actors run the driver's
IN_FLIGHT = 2  # units queued per actor: one running, one ready when it finishes


class Local:
    """Every unit in this process, in order."""

    def map(self, model, build: Callable, args: tuple, units: Sequence) -> Iterator[tuple[int, object]]:
        compute = build(model, *args)
        for i, unit in enumerate(units):
            yield i, compute(unit)


def _square_stage(model, *args):
    return lambda u: u * u


class Ray:
    """Units on a Ray cluster: ``actors`` actors (default: one per GPU with ``gpus_per_actor``, else
    one per ``cpus_per_actor`` CPUs of the cluster), each holding the model on ``device`` (default:
    ``cuda`` with GPUs, else the driver model's device) and running torch with ``threads`` threads
    (default ``cpus_per_actor``). ``address``: the cluster (``auto``, ``host:port``; None starts a
    local one unless Ray is already initialised). ``max_restarts``: restarts of a killed actor
    (its units are retried as often). :meth:`close` stops the actors, and a local cluster it started."""

    def __init__(
        self,
        address: str | None = None,
        actors: int | None = None,
        cpus_per_actor: float = 1,
        gpus_per_actor: float = 0,
        threads: int | None = None,
        device: str | None = None,
        max_restarts: int = 3,
    ):
        try:
            import ray
        except ImportError as e:
            raise InputError("Ray is not installed: pip install 'causalscan[ray]'", field="ray") from e
        check_options(actors=actors)
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=False,
                **({"num_cpus": os.cpu_count()} if address is None else {}),
            )
            self.started = address is None
        res = ray.cluster_resources()
        if actors is None:
            slots = res.get("GPU", 0) // gpus_per_actor if gpus_per_actor else res.get("CPU", 1) // cpus_per_actor
            actors = max(1, int(slots))
        need = {"CPU": actors * cpus_per_actor, "GPU": actors * gpus_per_actor}
        free = _free(ray, need)
        for kind, n in need.items():
            if n > free.get(kind, 0) + 1e-9:
                raise InputError(
                    f"{actors} actors need {n:g} {kind}s; the Ray cluster has {free.get(kind, 0):g} free "
                    f"(of {res.get(kind, 0):g})",
                    field="actors",
                )
        self.n = actors
        self.cpus, self.gpus = cpus_per_actor, gpus_per_actor
        self.threads = threads or max(1, int(cpus_per_actor))
        self.device = device or ("cuda" if gpus_per_actor else None)
        self.max_restarts = max_restarts
        self.actors: list = []
        self._model = None  # (id of the driver's Model, its object ref)

    def _start(self) -> None:
        if self.actors:
            return
        env = {k: os.environ[k] for k in ENV if k in os.environ}
        cls = self.ray.remote(Worker).options(
            num_cpus=self.cpus,
            num_gpus=self.gpus,
            max_restarts=self.max_restarts,
            max_task_retries=self.max_restarts,
            runtime_env={"env_vars": env} if env else None,
        )
        self.actors = [cls.remote(self.threads, self.device) for _ in range(self.n)]

    def pids(self) -> list[int]:
        """The actors' process ids (to watch them, or to kill one in a test)."""
        self._start()
        return self.ray.get([a.pid.remote() for a in self.actors])

    def map(self, model, build: Callable, args: tuple, units: Sequence) -> Iterator[tuple[int, object]]:
        """``(i, compute(units[i]))`` as the actors finish them (any order); ``compute = build(model,
        *args)`` is built once per actor with its own copy of ``model`` (a :class:`Model`, sent once)."""
        ray = self.ray
        if getattr(model.hf, "hf_device_map", None) is not None:
            raise InputError(
                "a model split across devices (device_map) runs in one process; each Ray actor holds "
                "a whole model on its device",
                field="executor",
            )
        self._start()
        if self._model is None or self._model[0] is not model:
            self._model = (model, ray.put(model))
        model_key = id(model)
        key = uuid.uuid4().hex
        refs = [self._model[1], ray.put((build, args))]
        todo, pending = deque(enumerate(units)), {}

        def submit(actor):
            i, unit = todo.popleft()
            pending[actor.run.remote(model_key, key, refs, unit)] = (i, actor)

        for actor in self.actors:
            for _ in range(IN_FLIGHT):
                if todo:
                    submit(actor)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            i, actor = pending.pop(ref)
            part = ray.get(ref)
            if todo:
                submit(actor)
            yield i, part

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
        if self.started:
            self.ray.shutdown()
            self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _free(ray, need: dict, wait_s: float = 10.0) -> dict:
    """The cluster's free resources, waited for up to ``wait_s`` while short of ``need`` (actors
    just killed, by a closed executor, give their CPUs back a moment later)."""
    deadline = time.monotonic() + wait_s
    while True:
        free = ray.available_resources()
        if all(n <= free.get(k, 0) + 1e-9 for k, n in need.items()) or time.monotonic() > deadline:
            return free
        time.sleep(0.2)


class Worker:
    """A Ray actor: the model on its device and the latest stages' ``compute``."""

    def __init__(self, threads: int, device: str | None):
        torch.set_num_threads(threads)
        self.device, self.model_key, self.model = device, None, None
        self.stages: OrderedDict = OrderedDict()

    def pid(self) -> int:
        return os.getpid()

    def run(self, model_key: int, key: str, refs: list, unit):
        import ray

        if model_key != self.model_key:  # a new model (or a restarted actor): fetch it once
            self.model, self.stages = ray.get(refs[0]), OrderedDict()
            if self.device is not None:
                self.model.hf.to(self.device)
            self.model_key = model_key
        compute = self.stages.get(key)
        if compute is None:
            build, args = ray.get(refs[1])
            compute = self.stages[key] = build(self.model, *args)
            while len(self.stages) > 2:
                self.stages.popitem(last=False)
        return compute(unit)


def get(executor) -> Local | Ray:
    """The executor to run on: ``None`` (this process), a :class:`Local` or :class:`Ray`."""
    if executor is None:
        return LOCAL
    if not isinstance(executor, Local | Ray):
        raise InputError(
            f"executor must be None, causalscan.executor.Local() or Ray(...), not {executor!r:.60}", field="executor"
        )
    return executor


LOCAL = Local()

__all__ = ["LOCAL", "Local", "Ray", "get"]
