"""Run independent jobs in worker processes with a progress bar, results in job order."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from utils.data.progress import progress

Result = TypeVar("Result")


def map_with_progress(function: Callable[[Any], Result], jobs: Sequence[Any], *, workers: int = 1,
                      description: str = "", unit: str = "case", show_progress: bool = True) -> list[Result]:
    """Apply ``function`` to every job, in ``workers`` processes (1: in this process).

    Args:
        function: a module-level function (it is pickled for the worker processes).
        jobs: its arguments, one per call.
        workers: number of processes, >= 1; worker processes are started with ``spawn``, so
            they do not inherit threads or GPU state from the caller.

    Returns:
        The results, in the order of ``jobs``. An exception in a job is raised here.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    results: list[Result] = []
    with progress(total=len(jobs), desc=description, unit=unit, disable=not show_progress) as bar:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(function(job))
                bar.update()
            return results
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
            for result in pool.map(function, jobs):
                results.append(result)
                bar.update()
    return results
