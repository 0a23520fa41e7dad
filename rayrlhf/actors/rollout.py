"""Rollout workers: Ray actors that each host one generation engine and stream completions.

A worker is a threaded actor. One background thread owns the engine: it builds it and runs its
loop (run the control calls waiting for the engine, take new requests, add them, step, hand
finished completions to the call that asked for them), so a `generate` call streams each
completion the moment it finishes while other calls (`load`, the weight sync, `checksums`) are
answered from other threads. Those threads never touch the engine: they hand their engine work
to the engine thread and wait for it, so a weight update or a checksum never interleaves with a
step, and between `begin_weight_update` and `finish_weight_update` the loop does not step.

Why one thread does all of the engine's compute: torch's OpenMP runtime (libgomp) keeps a team
of threads for every thread that starts parallel work. With two or more teams on a CPU node it
counts more threads than cores and makes every team's threads sleep between kernels instead of
spinning; waking them again cost about a fifth of CPU generation (bench/rollout_throughput.py,
docs/performance.md), when the engine was built on one thread and stepped on another.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import ray
from ray.actor import ActorHandle

from rayrlhf.actors.engines import Engine, make_engine
from rayrlhf.actors.health import identity, thread_stacks
from rayrlhf.actors.resources import default_threads, pin_to_cores
from rayrlhf.actors.types import Completion, GenerationRequest
from rayrlhf.actors.weights import Bucket
from rayrlhf.config import DataConfig, ModelConfig, RolloutConfig

log = logging.getLogger(__name__)

# Streaming generate calls each hold a thread until their last sample is out; they get their own
# concurrency group so that control calls (load, weight sync, checksums) never wait behind them.
GENERATE_CONCURRENCY = 64
CONTROL_CONCURRENCY = 16


class _Route:
    """Where the completions of one request go, and how many are still due."""

    __slots__ = ("sink", "remaining")

    def __init__(self, sink: queue.Queue, remaining: int) -> None:
        self.sink = sink
        self.remaining = remaining


@ray.remote(max_concurrency=CONTROL_CONCURRENCY, concurrency_groups={"generate": GENERATE_CONCURRENCY})
class RolloutWorker:
    """One generation engine behind a streaming, versioned, thread-safe actor interface."""

    def __init__(self, name: str, backend: str, engine_kwargs: dict[str, Any], cpus: list[int] | None = None,
                 episodes: dict[str, Any] | None = None) -> None:
        started = time.perf_counter()
        pin_to_cores(cpus)  # before the engine starts its threads (and TP processes), which inherit it
        self._name = name
        self._backend = backend
        self._cond = threading.Condition()  # guards the fields below; wakes the loop
        self._calls: list[tuple[Any, tuple, Future]] = []  # engine work handed over by other threads
        self._inbox: list[GenerationRequest] = []
        self._routes: dict[str, _Route] = {}
        self._outstanding = 0
        self._busy = False  # the engine holds unfinished requests
        self._updating = False
        self._failed: BaseException | None = None
        self._version = 0
        self._weight_group: Any = None
        self._episodes: Any = None  # set once the engine is up; the loop reads it
        built: Future = Future()
        self._thread = threading.Thread(target=self._run, args=(backend, engine_kwargs, built), name=f"{name}-engine",
                                        daemon=True)
        self._thread.start()
        self._engine: Engine = built.result()  # raises what building it raised
        if episodes:
            self._episodes = self._episode_runner(episodes)
        log.info("%s: %s engine started in %.1f s", name, backend, time.perf_counter() - started)

    def _episode_runner(self, episodes: dict[str, Any]) -> Any:
        """Multi-turn episodes (rayrlhf/actors/episodes.py): environments in child processes beside this worker, or
        the env actors; the chat format renders the turns around the sampled tokens."""
        from rayrlhf.actors.episodes import EpisodeRunner
        from rayrlhf.data.chat import chat_format
        from rayrlhf.envs import make_env_client
        from rayrlhf.models.loading import load_tokenizer

        tokenizer = load_tokenizer(episodes["model_path"], episodes.get("trust_remote_code", False))
        fmt = chat_format(tokenizer, episodes.get("apply_chat_template", True))
        envs = make_env_client(episodes["env"], self._name)
        return EpisodeRunner(envs, fmt, self._submit_turn, self._deliver_episode)

    def _submit_turn(self, request: GenerationRequest) -> None:
        with self._cond:
            self._inbox.append(request)
            self._cond.notify_all()

    def _deliver_episode(self, completion: Completion) -> None:
        with self._cond:
            completion.worker = self._name
            self._deliver(completion)

    # ----- engine loop ------------------------------------------------------------------------

    def _run(self, backend: str, engine_kwargs: dict[str, Any], built: Future) -> None:
        """The engine thread: build the engine here, then loop (see the module's docstring for why one thread)."""
        try:
            self._engine = make_engine(backend, **engine_kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor, which raises it
            built.set_exception(exc)
            return
        built.set_result(self._engine)
        self._loop()

    def _on_engine(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on the engine thread, between two steps, and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        done: Future = Future()
        with self._cond:
            if self._failed is not None:
                raise RuntimeError(f"{self._name}: the engine failed earlier: {self._failed!r}")
            self._calls.append((fn, args, done))
            self._cond.notify_all()
        return done.result()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._calls and (self._updating or not (self._inbox or self._busy)):
                    self._cond.wait()
                calls, self._calls = self._calls, []
            for fn, args, done in calls:
                try:
                    done.set_result(fn(*args))
                except BaseException as exc:  # noqa: BLE001 - raised in the thread that asked
                    done.set_exception(exc)
            with self._cond:
                if self._updating or self._calls:  # no stepping during an update; calls first
                    continue
                inbox, self._inbox = self._inbox, []
            finished: list[Completion] = []
            rejected_turns = []
            for request in inbox:
                try:
                    self._engine.add(request)
                except Exception as exc:  # bad request: fail its call (or its episode), keep serving others
                    if self._episodes is not None and self._episodes.owns(request.request_id):
                        rejected_turns.append((request, exc))
                    else:
                        self._reject(request, exc)
            try:
                if self._engine.has_unfinished():
                    finished = self._engine.step()
                busy = self._engine.has_unfinished()
            except BaseException as exc:
                log.exception("%s: engine step failed", self._name)
                self._fail_all(exc)
                return
            version = self._version
            turns = []
            with self._cond:
                self._busy = busy
                for completion in finished:
                    completion.weight_version = version
                    completion.worker = self._name
                    if self._episodes is not None and self._episodes.owns(completion.request_id):
                        turns.append(completion)
                    else:
                        self._deliver(completion)
            for completion in turns:  # outside the lock: the episode hands the turn to its environment
                self._episodes.on_turn(completion)
            for request, exc in rejected_turns:
                self._episodes.rejected(request, exc)

    def _deliver(self, completion: Completion) -> None:
        """Hand a completion to its caller (called with self._cond held)."""
        route = self._routes.get(completion.request_id)
        if route is None:  # its request was rejected; the call already failed
            return
        route.sink.put(completion)
        route.remaining -= 1
        self._outstanding -= 1
        if route.remaining == 0:
            del self._routes[completion.request_id]

    def _reject(self, request: GenerationRequest, exc: Exception) -> None:
        with self._cond:
            route = self._routes.pop(request.request_id, None)
            if route is not None:
                self._outstanding -= route.remaining
                route.sink.put(ValueError(f"request {request.request_id!r} rejected by the engine: {exc}"))

    def _fail_all(self, exc: BaseException) -> None:
        if self._episodes is not None:
            self._episodes.abort(f"the engine failed: {exc!r}")
        with self._cond:
            self._failed = exc
            for route in self._routes.values():
                route.sink.put(RuntimeError(f"{self._name}: the engine failed: {exc!r}"))
            self._routes.clear()
            self._outstanding = 0
            calls, self._calls = self._calls, []
        for _, _, done in calls:
            done.set_exception(RuntimeError(f"{self._name}: the engine failed: {exc!r}"))

    # ----- generation ---------------------------------------------------------------------------

    @ray.method(concurrency_group="generate")
    def generate(self, requests: list[GenerationRequest]) -> Iterator[list[Completion]]:
        """Yield the samples of `requests` as they finish (call with num_returns="streaming").

        Each yield is a list: every completion that finished since the last one (those of one
        engine step travel as one object instead of one object each). Completions carry the
        weight version the engine held when they finished and this worker's name. A request
        rejected by the engine (e.g. a prompt longer than the context) fails the call with
        ValueError.
        """
        sink: queue.Queue = queue.Queue()
        with self._cond:
            if self._failed is not None:
                raise RuntimeError(f"{self._name}: the engine failed earlier: {self._failed!r}")
            counts = collections.Counter(r.request_id for r in requests)
            clash = sorted(i for i, n in counts.items() if i in self._routes or n > 1)
            if clash:
                raise ValueError(f"{self._name}: request ids already in flight or repeated: {clash[:5]}")
            for request in requests:
                self._routes[request.request_id] = _Route(sink, len(request.sample_indices))
                self._outstanding += len(request.sample_indices)
            episodes = [r for r in requests if r.episode is not None]
            if episodes and self._episodes is None:
                raise ValueError(f"{self._name}: multi-turn requests, but this worker was started without env.*")
            self._inbox.extend(r for r in requests if r.episode is None)
            self._cond.notify_all()
        for request in episodes:  # their turns reach the engine as their environments answer
            self._episodes.start(request)
        due = sum(len(r.sample_indices) for r in requests)
        while due:
            batch = [sink.get()]
            while len(batch) < due:
                try:
                    batch.append(sink.get_nowait())
                except queue.Empty:
                    break
            for item in batch:
                if isinstance(item, BaseException):
                    raise item
            due -= len(batch)
            yield batch

    def load(self) -> int:
        """Samples submitted and not yet returned: the dispatcher's measure of how busy this worker is."""
        with self._cond:
            return self._outstanding

    def weight_version(self) -> int:
        return self._version

    def identity(self) -> tuple[str, int]:
        """(node id, pid), for a stack dump from outside should this worker hang."""
        return identity()

    def stacks(self) -> str:
        """Every thread's stack (answered from a control thread while the engine thread is stuck)."""
        return thread_stacks()

    def reset_prefix_cache(self) -> None:
        """Forget cached prompt KV (cached blocks are reused across requests with the same prefix)."""
        self._on_engine(self._engine.reset_prefix_cache)

    def weight_dtype(self) -> str:
        """The dtype this worker's engine computes in ('bfloat16', 'float32', ...), decided on its own node: weights
        travel in it, so the driver (maybe on a node without a GPU, where 'auto' means float32) asks instead."""
        return str(self._engine.dtype).removeprefix("torch.")

    def ready(self) -> bool:
        """True once the engine is up (the constructor built it); raises if the engine has failed."""
        if self._failed is not None:
            raise RuntimeError(f"{self._name}: the engine failed: {self._failed!r}")
        return True

    # ----- weight sync ------------------------------------------------------------------------

    def begin_weight_update(self, aliases: dict[str, str] | None = None) -> None:
        """Pause stepping and prepare the engine to receive buckets (`aliases`: the trainer's tied names).

        An update left unfinished (its sync was abandoned when a trainer rank failed) is closed first; the
        weights it left half-loaded are all overwritten by this one, which is verified."""
        self._on_engine(self._begin_update, aliases)

    def _begin_update(self, aliases: dict[str, str] | None) -> None:
        if self._updating:
            log.warning("%s: closing a weight update that was left unfinished", self._name)
            try:
                self._engine.finish_weight_update()
            except Exception as exc:  # noqa: BLE001 - the new update replaces every weight anyway
                log.warning("%s: closing it failed (%r); going on with the new update", self._name, exc)
        with self._cond:
            self._updating = True
        self._engine.begin_weight_update(aliases)

    def load_weights(self, bucket: Bucket) -> None:
        """Load one bucket of (HF name, array) pairs; call between begin and finish."""
        self._on_engine(self._load_bucket, bucket)

    def _load_bucket(self, bucket: Bucket) -> None:
        if not self._updating:
            raise RuntimeError(f"{self._name}: load_weights called without begin_weight_update")
        self._engine.load_weights(bucket)

    def finish_weight_update(self, version: int) -> None:
        """Complete the update, set the weight version stamped on later completions, resume stepping."""
        self._on_engine(self._finish_update, version)
        log.info("%s: weights at version %d", self._name, version)

    def _finish_update(self, version: int) -> None:
        if not self._updating:
            raise RuntimeError(f"{self._name}: finish_weight_update called without begin_weight_update")
        self._engine.finish_weight_update()
        self._version = version
        with self._cond:
            self._updating = False

    # ----- collective transport (see rayrlhf.actors.collective) -------------------------------

    def init_weight_group(self, addr: str, port: int, world_size: int, rank: int, group_name: str,
                          device: str | None = None, timeout_s: float = 600.0) -> None:
        """Join trainer rank 0's broadcast group as `rank` (blocks until every member has joined, at most
        `timeout_s`, which also bounds each broadcast).

        The group is on CUDA (NCCL) when this worker has a GPU, else on CPU (gloo).
        """
        import torch

        from rayrlhf.actors.collective import WeightGroup

        self.destroy_weight_group()
        device = device or ("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")
        self._weight_group = WeightGroup(addr, port, world_size, rank, group_name, device, timeout_s)

    def destroy_weight_group(self) -> None:
        group, self._weight_group = self._weight_group, None
        if group is not None:
            group.destroy()

    def receive_weights(self, metadata: list[tuple[str, tuple[int, ...], Any]], bucket_bytes: int) -> int:
        """Receive every tensor of `metadata` in order from root 0 and load them in buckets of ~`bucket_bytes`.

        Call between begin_weight_update and finish_weight_update, while the trainer broadcasts.
        Returns the number of buckets loaded.
        """
        import torch

        from rayrlhf.actors.weights import to_numpy

        group = self._weight_group
        if group is None:
            raise RuntimeError(f"{self._name}: receive_weights before init_weight_group")
        if not self._updating:
            raise RuntimeError(f"{self._name}: receive_weights called without begin_weight_update")
        loaded = 0
        bucket: Bucket = []
        size = 0

        def flush() -> None:
            nonlocal bucket, size, loaded
            self._on_engine(self._load_bucket, bucket)
            bucket, size, loaded = [], 0, loaded + 1

        for name, shape, dtype in metadata:
            tensor = torch.empty(shape, dtype=dtype, device=group.device)
            group.broadcast(tensor)
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and size + nbytes > bucket_bytes:
                flush()
            bucket.append((name, to_numpy(tensor)))  # zero-copy for a CPU tensor
            size += nbytes
        if bucket:
            flush()
        return loaded

    def checksums(self, names: list[str]) -> dict[tuple[str, Any], str]:
        """{(checkpoint name, region): checksum} of every weight piece the engine computes with
        (`names`: the trainer's checkpoint names; compare with `weight_sync.verify_weights`)."""
        return self._on_engine(self._checksums, names)

    def _checksums(self, names: list[str]) -> dict[tuple[str, Any], str]:
        if self._updating:
            raise RuntimeError(f"{self._name}: checksums requested during a weight update")
        return self._engine.checksums(names)


def _engine_kwargs(
    backend: str, model_path: str, rollout_cfg: RolloutConfig, model_cfg: ModelConfig, seed: int, max_model_len: int
) -> dict[str, Any]:
    dtype = model_cfg.dtype if rollout_cfg.dtype == "auto" else rollout_cfg.dtype
    common = {"model_path": model_path, "dtype": dtype, "seed": seed, "trust_remote_code": model_cfg.trust_remote_code}
    if backend == "vllm":
        return {
            **common,
            "max_model_len": max_model_len,
            "gpu_memory_utilization": rollout_cfg.gpu_memory_utilization,
            "tensor_parallel_size": rollout_cfg.tensor_parallel_size,
            "enforce_eager": rollout_cfg.enforce_eager,
            "max_num_seqs": rollout_cfg.max_num_seqs,
            # a LoRA policy synced as an adapter: the engine serves the trainer's adapter in vLLM's LoRA slots
            "lora": lora.model_dump() if (lora := model_cfg.lora) is not None and lora.sync == "adapter" else None,
        }
    hf = {**common, "device": "cuda" if rollout_cfg.num_gpus > 0 else "cpu"}
    return {**hf, "max_batch_size": rollout_cfg.max_num_seqs} if rollout_cfg.max_num_seqs else hf


def create_rollout_workers(
    model_path: str | Path,
    rollout_cfg: RolloutConfig,
    model_cfg: ModelConfig,
    seed: int,
    num_workers: int | None = None,
    max_prompt_tokens: int | None = None,
    max_model_len: int | None = None,
    name_prefix: str = "rollout",
    wait: bool = True,
    max_restarts: int = 0,
    episodes: dict[str, Any] | None = None,
) -> list[ActorHandle]:
    """Start `num_workers` (default rollout.num_workers) workers named `{name_prefix}-{i}`.

    The engine context is `max_model_len`, else rollout.max_model_len, else max_prompt_tokens
    (pass data.max_prompt_tokens; default: its default) plus rollout.max_new_tokens. Worker i samples with seed + i so workers do not repeat each
    other. With `wait`, returns once every engine is up; if one fails, all are killed and the
    error is raised. `episodes` (env config, model path, chat-template flag) makes them run multi-turn episodes. Ray restarts a worker whose process dies up to `max_restarts` times (its
    engine starts again from `model_path`: the caller pushes the current weights back in).
    """
    count = num_workers if num_workers is not None else rollout_cfg.num_workers
    if max_prompt_tokens is None:
        max_prompt_tokens = DataConfig.model_fields["max_prompt_tokens"].default
    max_model_len = max_model_len or rollout_cfg.max_model_len or max_prompt_tokens + rollout_cfg.max_new_tokens
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # engine core in the actor: weights pass by reference
    # Generation and training take turns in the on-policy loop, so an engine may use the node's cores
    # (vLLM otherwise drops to one thread); workers and their tensor-parallel ranks share them.
    threads = rollout_cfg.num_threads or default_threads(
        model_path, count * rollout_cfg.tensor_parallel_size, len(rollout_cfg.cpus) if rollout_cfg.cpus else None
    )
    env["OMP_NUM_THREADS"] = str(threads)
    if rollout_cfg.num_gpus == 0:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # pinning OpenMP threads made CPU decoding ~6x slower
    workers = []
    for i in range(count):
        name = f"{name_prefix}-{i}"
        kwargs = _engine_kwargs(rollout_cfg.backend, str(model_path), rollout_cfg, model_cfg, seed + i, max_model_len)
        workers.append(
            RolloutWorker.options(
                name=name,
                get_if_exists=False,
                num_cpus=rollout_cfg.num_cpus,
                num_gpus=rollout_cfg.num_gpus,
                resources=dict(rollout_cfg.resources) or None,
                scheduling_strategy="SPREAD" if rollout_cfg.placement == "spread" else "DEFAULT",
                max_concurrency=CONTROL_CONCURRENCY,
                max_restarts=max_restarts,
                runtime_env={"env_vars": env},
            ).remote(name, rollout_cfg.backend, kwargs, rollout_cfg.cpus, episodes)
        )
    if wait:
        try:
            ray.get([w.ready.remote() for w in workers])
        except Exception:
            for w in workers:
                ray.kill(w)
            raise
    log.info("started %d %s rollout workers (max_model_len %d)", count, rollout_cfg.backend, max_model_len)
    return workers
