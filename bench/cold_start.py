#!/usr/bin/env python3
"""Provider cold start: from launching the plugin to its answers to the first calls of a `pulumi preview`.

The Pulumi engine starts the provider for every preview and up. This measures,
for the plugin as the engine starts it, the time until it prints its port, and
until it has answered GetSchema, Configure and a Check (of a machine given by
`systemPath`, so no Nix evaluation is timed). Its baseline, in the same run and
alternating pair by pair, is the same provider with everything imported up front
(the Pulumi SDK and asyncssh, as it started before the first calls imported only
what they need); the Python interpreter's own start is printed as the floor.

Python's bytecode is cached as a user's install has it (the plugin archive
carries it, and a writable install writes it on its first launch): the runs use
a bytecode cache of their own (PYTHONPYCACHEPREFIX), filled by a first launch
that is not timed. Without bytecode each launch also compiles every module.

Run with `python bench/cold_start.py` (or `make bench`); no lab host is needed.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from google.protobuf import struct_pb2
from pulumi.runtime.proto import provider_pb2, provider_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
RUNS = 15
PROVIDER = [sys.executable, "-m", "nixos_provider"]
# The provider as it started before: the SDK and SSH imported before anything else.
EAGER = [sys.executable, "-c", "import pulumi, pulumi.runtime.proto, asyncssh, runpy; "
         "runpy.run_module('nixos_provider', run_name='__main__')"]
URN = "urn:pulumi:bench::cold::nixos:index:NixosMachine::web"
GOAL_TO_PORT = 0.35  # seconds, issue #14
# Bytecode written once and read by every timed launch, as in an installed plugin.
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
       "PYTHONPYCACHEPREFIX": tempfile.mkdtemp(prefix="pulumi-nixos-bytecode-")}


def first_calls(argv: list[str]) -> tuple[float, float]:
    """Seconds from launch to the port, and to the answers of GetSchema, Configure and Check."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=REPO, env=ENV)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        to_port = time.monotonic() - started
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = provider_pb2_grpc.ResourceProviderStub(channel)
            stub.GetSchema(provider_pb2.GetSchemaRequest(version=0))
            stub.Configure(provider_pb2.ConfigureRequest(acceptSecrets=True, acceptResources=True))
            news = struct_pb2.Struct()
            news.update({"connection": {"host": "127.0.0.1", "port": 2222},
                         "systemPath": "/nix/store/00000000000000000000000000000000-nixos-system-web"})
            res = stub.Check(provider_pb2.CheckRequest(urn=URN, news=news, olds=struct_pb2.Struct()))
            assert not res.failures, res.failures
        return to_port, time.monotonic() - started
    finally:
        proc.terminate()
        proc.wait()


def interpreter() -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=ENV)
    return time.monotonic() - started


def main() -> None:
    first_calls(PROVIDER), first_calls(EAGER)  # write the bytecode, warm the page cache
    lazy: list[tuple[float, float]] = []
    eager: list[tuple[float, float]] = []
    for _ in range(RUNS):
        lazy.append(first_calls(PROVIDER))
        eager.append(first_calls(EAGER))
    floor = statistics.median(interpreter() for _ in range(RUNS))
    ratios = [a[1] / b[1] for a, b in zip(lazy, eager, strict=True)]
    port = statistics.median(t[0] for t in lazy)
    calls = statistics.median(t[1] for t in lazy)
    before = statistics.median(t[1] for t in eager)
    print(f"\nmachine: {os.cpu_count()} cores; medians of {RUNS} pairs\n")
    print("| benchmark | result |\n| --- | --- |")
    print(f"| provider cold start, launch to port | {port:.2f} s, **{port / GOAL_TO_PORT:.2f}x** the goal of "
          f"{GOAL_TO_PORT} s (Python alone: {floor:.2f} s) |")
    print(f"| provider cold start, launch to GetSchema + Configure + Check answered | {calls:.2f} s; "
          f"everything imported up front (as before): {before:.2f} s; ratio **{statistics.median(ratios):.2f}x** "
          f"(pairwise min {min(ratios):.2f}, max {max(ratios):.2f}) |")


if __name__ == "__main__":
    try:
        main()
    finally:
        shutil.rmtree(ENV["PYTHONPYCACHEPREFIX"], ignore_errors=True)
