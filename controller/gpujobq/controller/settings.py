"""The controller's settings: one object, built in __main__ and passed down."""

from __future__ import annotations

import pathlib

import msgspec


class Settings(msgspec.Struct, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8001
    database: pathlib.Path = pathlib.Path("var/gpujobq.db")
    inventory: pathlib.Path = pathlib.Path("inventory.yaml")
    results_dir: pathlib.Path = pathlib.Path("var/results")
    client_key: pathlib.Path = pathlib.Path("var/controller/id_ed25519")
    # A waiting submit answers 202 (job id, current status) after this many seconds,
    # below the guide's Python example's 300 s client timeout.
    wait_cap: float = 270.0
    # Rate limits (the guide's): submissions per sliding window, and active jobs per user.
    submit_limit: int = 5
    submit_window: float = 60.0
    active_limit: int = 1
    # A job may run for time_limit_factor x expected_time (the original used 2x), at most
    # its competition's time_cap (inventory.yaml); then SIGTERM, `grace` seconds, SIGKILL.
    time_limit_factor: float = 2.0
    grace: float = 10.0
    output_cap: int = 1 << 20  # bytes kept per stream (head and tail, marker between)
    # Submissions: each part, and the whole request (413 past any of them). config.yaml
    # is parsed only within its cap.
    max_code: int = 1 << 20  # bytes of solution.py
    max_config: int = 64 << 10  # bytes of config.yaml
    max_upload: int = 2 << 20  # bytes of one submit request, both parts and the framing
    token_days: float = 90.0  # default lifetime of a new token
    # Agents: SSH keepalive, reconnect backoff, and when a silent host's jobs are requeued.
    keepalive: float = 10.0
    backoff_max: float = 30.0
    node_lost_after: float = 120.0
    # Agents stop their jobs after `lease` seconds without a word from the controller; a
    # down host's jobs are requeued only after max(node_lost_after, lease + lease_margin),
    # so no job runs twice at once across a partition.
    lease: float = 120.0
    lease_margin: float = 15.0
    # A connected host not heard from (heartbeats come every 5 s) for this long is down.
    heartbeat_timeout: float = 20.0
    # How often inventory.yaml is checked for changes (it is also reloaded on SIGHUP).
    inventory_poll: float = 2.0
    max_retries: int = 2  # platform failures requeue a job at most this many times
