"""The handler benchmark's multi-worker bookkeeping: a worker that dies without a report."""

import multiprocessing
import os
import threading

import pytest

from bench.handler_bench import collect_reports

pytestmark = pytest.mark.unit


def wait_then_report(ready, results) -> None:
    try:
        ready.wait()
        results.put((1, 0.0, [], None))
    except threading.BrokenBarrierError as error:
        results.put((1, 0.0, [], repr(error)))


def test_a_worker_that_dies_without_a_report_releases_the_others():
    context = multiprocessing.get_context("fork")
    ready, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=os._exit, args=(3,)),  # like the OOM killer: no exception, no report
                 context.Process(target=wait_then_report, args=(ready, results))]
    for process in processes:
        process.start()
    reports = sorted(collect_reports(processes, results, ready))
    assert reports[0][3] == "worker exited with code 3"
    assert "BrokenBarrierError" in reports[1][3]
