"""Fan-out for batch jobs, written once: work units over a Ray Data actor pool with progress and a summary.

A job describes its work as a list of units (plain dicts of str/int: Ray Data rows) and an actor class
whose `__call__(batch)` processes a batch of one unit and returns `{"<count>": [n]}`; each actor loads its
model once. The job itself decides which units are already finished (its outputs are written atomically
through `Storage`, so a finished unit's output is complete) and passes only the rest. `fan_out` sizes the
pool (one GPU per actor on a cluster, CPU actors locally), prints one progress line per unit with rate and
ETA, and returns the totals. Later jobs (generate, attribute, evaluate) use it the same way.
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass

import ray

from cxrray.data.storage import WRITER_ENV, Storage
from cxrray.pipelines.settings import ActorPoolConfig


@dataclass
class FanOutResult:
    units: int  # units processed now
    counted: int  # sum of the actors' `count` field
    seconds: float

    @property
    def rate(self) -> float:
        return self.counted / self.seconds if self.seconds > 0 else 0.0


def pool_args(pool: ActorPoolConfig) -> dict:
    """Ray Data actor-pool arguments: one GPU each on a cluster, else one CPU each (two locally); a fixed size,
    or (min, max) for an autoscaling pool; plus the pool's custom resources."""
    if pool.use_gpu:
        args, size = {"num_gpus": 1}, pool.actors or max(1, int(ray.cluster_resources().get("GPU", 1)))
    else:
        args, size = {"num_cpus": 1}, pool.actors or max(1, min(2, int(ray.cluster_resources().get("CPU", 1))))
    autoscaling = pool.min_actors is not None and pool.min_actors < size
    args["concurrency"] = (pool.min_actors, size) if autoscaling else size  # (min, max): Ray Data autoscales it
    if pool.actor_resources:
        args["resources"] = dict(pool.actor_resources)
    return args

def eta(done: int, total: int, elapsed: float) -> str:
    """'m:ss' left at the rate so far ('?' before the first unit)."""
    if done <= 0:
        return "?"
    left = max(0.0, elapsed / done * (total - done))
    return f"{int(left // 60)}:{int(left % 60):02d}"


def _tagged(actor: type, writer: str) -> type:
    """`actor` whose processes tag their temporary files with `writer` (see `Storage.write_bytes`)."""

    class Tagged(actor):
        def __init__(self, **kwargs):
            os.environ[WRITER_ENV] = writer
            super().__init__(**kwargs)

    Tagged.__name__, Tagged.__qualname__ = actor.__name__, actor.__qualname__
    return Tagged


def fan_out(job: str, units: list[dict], actor: type, constructor_kwargs: dict, pool: ActorPoolConfig,
            output: Storage, *, count: str = "rows", what: str = "items") -> FanOutResult:
    """Run `actor` over `units` (one unit per call) on an actor pool; prints
    `[job] i/N units  k what  r what/s  ETA m:ss` after each unit and returns the totals. An actor lost with
    its node is restarted and its unit retried by Ray Data; what it was writing to `output` when it died
    (a `.tmp-<this pool's tag>` file) is removed once the pool is done, so only whole outputs remain and
    another job's writes in flight are left alone."""
    if not units:
        return FanOutResult(0, 0, 0.0)
    writer = f"{uuid.uuid4().hex[:8]}-"
    ds = ray.data.from_items(units, override_num_blocks=len(units)).map_batches(
        _tagged(actor, writer), batch_size=1, fn_constructor_kwargs=constructor_kwargs, **pool_args(pool))
    start, counted, done = time.perf_counter(), 0, 0
    for done, row in enumerate(ds.iter_rows(), start=1):
        counted += int(row[count])
        elapsed = time.perf_counter() - start
        print(f"[{job}] {done}/{len(units)} units  {counted:,} {what}  {counted / max(elapsed, 1e-9):.2f} {what}/s  "
              f"ETA {eta(done, len(units), elapsed)}", flush=True)
    stranded = output.remove_partial(writer=writer)
    result = FanOutResult(done, counted, time.perf_counter() - start)
    print(f"[{job}] {result.units} units, {counted:,} {what} in {result.seconds:.1f} s ({result.rate:.2f} {what}/s)"
          + (f"; removed {stranded} partial file(s) of lost actors" if stranded else ""), flush=True)
    return result
