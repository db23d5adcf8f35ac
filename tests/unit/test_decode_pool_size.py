"""How many decode processes a GPU worker starts by itself (`handler.decode_processes: gpu`):
its share of the host's cores, a container's CPU limit included."""

import pytest

from handler.cpu_cores import cgroup_cpu_quota, usable_cores
from handler.preparation import MAX_GPU_DECODE_PROCESSES, gpu_decode_processes

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("cores", "gpus", "processes"), [
    (16, 1, 15),  # the H100 host of docs/benchmarks.md (run 7)
    (96, 8, 11),  # one worker per GPU, each with its share
    (8, 1, 7),  # deploy/k8s: a CPU limit of 8
    (2, 1, 1), (1, 1, 1), (4, 8, 1),  # always at least one
    (192, 1, MAX_GPU_DECODE_PROCESSES),  # capped: each process holds its own torch
    (16, 0, 15),  # no GPU visible to count: the whole host
])
def test_a_gpu_worker_takes_its_share_of_the_cores_less_one(cores, gpus, processes):
    assert gpu_decode_processes(cores, gpus) == processes


def write(folder, name, text):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "800000 100000\n"}, 8.0),
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu.max": "garbage\n"}, None),
    ({}, None),
])
def test_the_containers_cpu_quota_is_read_from_cgroup_v2_or_v1(tmp_path, files, quota):
    for name, text in files.items():
        write(tmp_path, name, text)
    assert cgroup_cpu_quota(tmp_path) == quota


def test_usable_cores_are_the_affinity_capped_by_the_quota(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert usable_cores(tmp_path) == 16  # no quota
    write(tmp_path, "cpu.max", "150000 100000\n")
    assert usable_cores(tmp_path) == 2  # 1.5 cores of quota: 2 can run at once
    write(tmp_path, "cpu.max", "6400000 100000\n")
    assert usable_cores(tmp_path) == 16  # a quota above the affinity does not add cores
