"""The exact container a job gets (pure: no daemon needed)."""

from __future__ import annotations

import pathlib

from docker.types import DeviceRequest, LogConfig, Mount, Ulimit
from gpujobq.agent import containers
from gpujobq.protocol import messages

LIMITS = containers.Limits(memory=1 << 30, cpus=2, pids=100, tmp_size=1 << 20,
                           shm_size=1 << 21, output_size=1 << 22, nofile=512)


def job(*gpus: messages.GPU, network: bool = False) -> messages.RunJob:
    return messages.RunJob(job_id="j1", attempt=3, code=b"", config=b"", gpus=gpus,
                           time_limit=10, network=network)


def build(run: messages.RunJob, mode: containers.GpuMode = "request") -> dict:
    return containers.spec(run, image="img:1", job_dir=pathlib.Path("/spool/j1-a3/job"),
                           output_dir=pathlib.Path("/spool/j1-a3/output"), limits=LIMITS,
                           gpu_mode=mode, host="node7")


TWO = (messages.GPU(index=2, uuid="GPU-aaa"), messages.GPU(index=5, uuid="GPU-bbb"))


def test_two_gpu_job_spec_is_exactly_this() -> None:
    assert build(job(*TWO)) == {
        "image": "img:1",
        "command": ["python3", "/job/solution.py"],
        "name": "gpujobq-j1-a3",
        "labels": {"gpujobq.job": "j1", "gpujobq.attempt": "3", "gpujobq.host": "node7"},
        "working_dir": "/job",
        "user": "65534:65534",
        "environment": {
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "GPUJOBQ_JOB_ID": "j1",
            "GPUJOBQ_ATTEMPT": "3",
            "GPUJOBQ_OUTPUT": "/output",
            "NVIDIA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb",
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
            "CUDA_VISIBLE_DEVICES": "0,1",
        },
        "network_disabled": True,
        "hostname": "job",
        "read_only": True,
        "tmpfs": {"/tmp": "rw,nosuid,nodev,size=1048576"},
        "mounts": [
            Mount(target="/job", source="/spool/j1-a3/job", type="bind", read_only=True),
            Mount(target="/output", source="/spool/j1-a3/output", type="bind",
                  read_only=False),
            Mount(target="/etc/hosts", source="/spool/j1-a3/hosts", type="bind",
                  read_only=True),
        ],
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "privileged": False,
        "init": True,
        "ipc_mode": "private",
        "pids_limit": 100,
        "mem_limit": 1 << 30,
        "memswap_limit": 1 << 30,
        "nano_cpus": 2_000_000_000,
        "shm_size": 1 << 21,
        "ulimits": [Ulimit(name="nofile", soft=512, hard=512),
                    Ulimit(name="core", soft=0, hard=0),
                    Ulimit(name="fsize", soft=1 << 22, hard=1 << 22)],
        "log_config": LogConfig(type="json-file", config={"max-size": "10m", "max-file": "2"}),
        "stdin_open": False,
        "tty": False,
        "device_requests": [DeviceRequest(device_ids=["GPU-aaa", "GPU-bbb"],
                                          capabilities=[["gpu"]])],
    }


def test_gpus_without_uuid_are_requested_by_index() -> None:
    spec = build(job(messages.GPU(index=3)))
    assert spec["device_requests"][0]["DeviceIDs"] == ["3"]
    assert spec["environment"]["NVIDIA_VISIBLE_DEVICES"] == "3"


def test_legacy_nvidia_runtime() -> None:
    spec = build(job(*TWO), mode="runtime")
    assert spec["runtime"] == "nvidia"
    assert "device_requests" not in spec
    assert spec["environment"]["NVIDIA_VISIBLE_DEVICES"] == "GPU-aaa,GPU-bbb"


def test_virtual_gpus_get_no_device() -> None:
    spec = build(job(messages.GPU(index=1, virtual=True)))
    assert "device_requests" not in spec and "runtime" not in spec
    assert spec["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert spec["environment"]["CUDA_VISIBLE_DEVICES"] == "1"


def test_network_only_where_the_competition_allows_it() -> None:
    assert build(job(network=True))["network_mode"] == "bridge"
    assert build(job())["network_disabled"] is True  # its own namespace, loopback only
    assert "network_mode" not in build(job())


def test_never_privileged_never_the_docker_socket_never_host_namespaces() -> None:
    spec = build(job(*TWO))
    assert spec["privileged"] is False
    assert all("docker.sock" not in m["Source"] for m in spec["mounts"])
    assert not any(spec.get(k) == "host" for k in ("network_mode", "ipc_mode", "pid_mode",
                                                   "userns_mode", "uts_mode"))
    writable = [m["Target"] for m in spec["mounts"] if not m["ReadOnly"]]
    assert writable == ["/output"]


def test_competition_data_is_bound_read_only_after_the_job_folders() -> None:
    run = messages.RunJob(job_id="j1", attempt=3, code=b"", config=b"", time_limit=10,
                          mounts=(messages.Mount(source="/srv/cifar", target="/data"),))
    mounts = build(run)["mounts"]
    assert mounts[3:] == [Mount(target="/data", source="/srv/cifar", type="bind",
                                read_only=True)]
    assert [m["Target"] for m in mounts[:3]] == ["/job", "/output", "/etc/hosts"]
