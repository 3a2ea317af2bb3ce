"""Fan a sweep's scenarios out as Ray tasks, on a local Ray (the machine's cores) or an existing cluster.

The Ray layer is thin on purpose: :func:`sim.engine.run_scenario` is a plain function; here it is wrapped in a
``@ray.remote`` task, the shared :class:`~sim.engine.World` goes into the object store once, results are collected
with ``ray.wait`` as they finish (a tqdm bar counts them), and a scenario that raises becomes a result row with its
parameters and the error, while the rest of the sweep goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from moevit.sim.config import Scenario
from moevit.sim.engine import ScenarioResult, World, run_scenario
from tqdm import tqdm

log = logging.getLogger("moevit.sim")

__all__ = ["RaySession", "run_local", "run_sweep"]


@ray.remote
def _scenario_task(world: World, scenario: Scenario) -> ScenarioResult:
    return run_scenario(world, scenario)


def _error_result(scenario: Scenario, err: BaseException) -> ScenarioResult:
    cause = getattr(err, "cause", None) or err
    text = str(cause).strip().splitlines()
    msg = f"{type(cause).__name__}: {text[0] if text else ''}".strip()
    return ScenarioResult(params=scenario.params(), error=msg)


class RaySession:
    """Start Ray for the duration of a ``with`` block unless it is already running (then leave it alone).

    ``address`` joins an existing cluster (``"auto"`` or ``"ray://host:10001"``); otherwise a local Ray with
    ``num_cpus`` CPUs starts, without a dashboard."""

    def __init__(self, *, address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = False
                 ) -> None:
        self.address, self.num_cpus, self.log_to_driver = address, num_cpus, log_to_driver
        self.started = False

    def __enter__(self) -> RaySession:
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=self.log_to_driver)
            else:
                self._start_local()
            self.started = True
        return self

    def _start_local(self) -> None:
        """A local Ray; started again once when its node times out during startup (seen once in a full test run on
        the quiet 2-core machine: its GCS did not answer within 30 s; started again, the same tests passed)."""
        for attempt in (1, 2):
            try:
                ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=self.log_to_driver)
                return
            except Exception as e:  # ray raises a bare Exception for this
                if attempt == 2 or "timed out during startup" not in str(e):
                    raise
                log.warning("Ray's node timed out during startup; starting it again: %s", e)
                ray.shutdown()

    def __exit__(self, *exc: object) -> None:
        if self.started:
            ray.shutdown()


def run_sweep(world: World, scenarios: Sequence[Scenario], *, progress: bool = True,
              max_in_flight: int | None = None, on_result: Callable[[ScenarioResult], None] | None = None
              ) -> list[ScenarioResult]:
    """Run every scenario as a Ray task (Ray must be initialised: see :class:`RaySession`); results come back in
    the order of ``scenarios``. At most ``max_in_flight`` tasks are submitted at once (default: 4 per CPU), so a
    large sweep does not flood the object store."""
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: run the sweep inside `with RaySession(...)`")
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    limit = max_in_flight or 4 * cpus
    world_ref = ray.put(world)
    results: list[ScenarioResult | None] = [None] * len(scenarios)
    pending: dict[Any, int] = {}
    nxt = 0
    bar = tqdm(total=len(scenarios), unit="scenario", desc="simulating", disable=not progress, dynamic_ncols=True)
    errors = 0
    try:
        while nxt < len(scenarios) or pending:
            while nxt < len(scenarios) and len(pending) < limit:
                pending[_scenario_task.remote(world_ref, scenarios[nxt])] = nxt
                nxt += 1
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as e:  # a RayTaskError wraps the scenario's own exception: reported, sweep goes on
                    res = _error_result(scenarios[i], e)
                if res.error is not None:
                    errors += 1
                    bar.write(f"moe-sim: scenario {scenarios[i].id} failed: {res.error}")
                results[i] = res
                if on_result is not None:
                    on_result(res)
                bar.update(1)
                if errors:
                    bar.set_postfix(errors=errors)
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref, force=True)
    return [r for r in results if r is not None]


def run_local(world: World, scenarios: Sequence[Scenario], *, progress: bool = False) -> list[ScenarioResult]:
    """The same sweep in this process, one scenario after another (no Ray): for tests and quick looks."""
    out = []
    for sc in tqdm(scenarios, unit="scenario", desc="simulating", disable=not progress):
        t0 = time.perf_counter()
        try:
            out.append(run_scenario(world, sc))
        except Exception as e:  # reported with the scenario's parameters; the sweep goes on
            r = _error_result(sc, e)
            r.wall_s = time.perf_counter() - t0
            out.append(r)
    return out

