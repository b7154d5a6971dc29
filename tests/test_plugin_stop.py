"""How the plugin stops. The engine sends SIGINT to the plugin's process group when it is done with it, and SIGKILL
5 s later; a Ctrl-C in a terminal sends SIGINT too, while operations run. Idle, the plugin stops at once (no
`pulumi` command waits those 5 s); with an operation in flight it keeps serving, for the engine's Cancel."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from pulumi.runtime.proto import provider_pb2, provider_pb2_grpc

PLUGIN = Path(__file__).resolve().parents[1] / "provider" / "pulumi-resource-nixos"


class Plugin:
    def __init__(self, cwd: Path) -> None:
        self.proc = subprocess.Popen([str(PLUGIN)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout is not None
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.proc.stdout.readline().strip()}")
        self.stub = provider_pb2_grpc.ResourceProviderStub(self.channel)
        self.stub.Configure(provider_pb2.ConfigureRequest(acceptSecrets=True), timeout=30)


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[Plugin]:
    p = Plugin(tmp_path)
    yield p
    p.channel.close()
    if p.proc.poll() is None:
        p.proc.kill()
    _, written = p.proc.communicate(timeout=10)
    assert "Traceback" not in written, f"the plugin wrote a traceback to its stderr:\n{written}"


def test_an_idle_plugin_stops_at_once_on_sigint(plugin: Plugin) -> None:
    started = time.monotonic()
    plugin.proc.send_signal(signal.SIGINT)
    assert plugin.proc.wait(timeout=4) == 0
    assert time.monotonic() - started < 4


def test_sigint_during_an_operation_leaves_it_to_the_engine(plugin: Plugin) -> None:
    # A host that accepts the connection and never answers: listGenerations waits for it (connectTimeout).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        args = struct_pb2.Struct()
        args.update({"connection": {"host": "127.0.0.1", "port": silent.getsockname()[1], "password": "unused",
                                    "connectTimeout": 4, "retries": 1}})
        call = plugin.stub.Invoke.future(provider_pb2.InvokeRequest(tok="nixos:index:listGenerations", args=args),
                                         timeout=60)
        time.sleep(1.5)
        plugin.proc.send_signal(signal.SIGINT)  # a Ctrl-C reaching the process group
        time.sleep(1.0)
        assert plugin.proc.poll() is None, "the plugin stopped with an operation in flight"
        with pytest.raises(grpc.RpcError) as failed:
            call.result()
        assert "timed out" in str(failed.value.details()) or "cannot connect" in str(failed.value.details())
    # Done: the next SIGINT (the engine's) stops it.
    plugin.proc.send_signal(signal.SIGINT)
    assert plugin.proc.wait(timeout=4) == 0
