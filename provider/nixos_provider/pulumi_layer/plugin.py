"""The plugin process: the engine's address from the command line, the stack's evaluations begun before the rest
of the provider loads, the gRPC server on a port it prints, the signals, and the exit when the engine that started
it is gone."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import signal
import sys
from typing import TYPE_CHECKING

from ..engine.nix.evaluation import EvaluationStore, Evaluator

if TYPE_CHECKING:
    from .server import Provider

FLAGS_WITH_VALUE = {"--tracing", "--logflow", "-v", "--root"}


def engine_address_from(argv: list[str]) -> str | None:
    """The engine's address is the last argument; flags (some with a value, like `--tracing URL`) come first."""
    rest: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in FLAGS_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            rest.append(arg)
    return rest[-1] if rest else None


def started_by_the_engine() -> bool:
    """Whether the Pulumi engine started this plugin, not a language host (`pulumi-language-yaml` starts one of its
    own to read the schema, beside the engine's, with an engine address too; no Check follows there). The parent's
    program name says it, where Linux's /proc can tell; elsewhere nothing begins before the first Check."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            program = f.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return False
    return bool(program) and "pulumi-language-" not in os.path.basename(program)


def place() -> str:
    """Where the engine runs this plugin: the project's directory (its working directory) and name."""
    return json.dumps([os.getcwd(), os.environ.get("PULUMI_PROJECT", "")])


async def serve(argv: list[str]) -> None:
    engine_address = engine_address_from(argv)
    evaluator = Evaluator(EvaluationStore.default())
    if engine_address and started_by_the_engine():
        evaluator.begin(place())
    # The rest (gRPC, Pulumi's protobuf modules, every resource) takes a few hundred milliseconds to import,
    # which the Nix processes begun above would otherwise wait for: imported on a thread, while this loop
    # drives them.
    servicer = await asyncio.to_thread(importlib.import_module, "nixos_provider.pulumi_layer.server")
    import grpc
    from pulumi.runtime.proto import provider_pb2_grpc

    provider: Provider = servicer.Provider(engine_address, evaluator)
    if engine_address:
        await provider.start_logging()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 400 * 1024 * 1024)])
    provider_pb2_grpc.add_ResourceProviderServicer_to_server(provider, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, provider.interrupted)
    print(port, flush=True)
    await exit_when_orphaned(provider)


ORPHAN_CHECK_INTERVAL = 1.0
ORPHAN_GRACE = 10.0


async def _reachable(address: str | None) -> bool:
    if not address or ":" not in address:
        return True
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return True
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout=5)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def exit_when_orphaned(provider: Provider) -> None:
    """Serve until the process that started us (the Pulumi engine) is gone, then exit.

    A killed `pulumi` CLI never stops its plugins; left alone they would run
    forever. Deployments in flight are cancelled first, which tells their
    supervisors to roll back (they finish that on the target by themselves).
    """
    parent = os.getppid()
    unreachable = 0
    while os.getppid() == parent and unreachable < 3:
        await asyncio.sleep(ORPHAN_CHECK_INTERVAL)
        # A provider started by the language host outlives the CLI with it:
        # the engine's address, which dies with the CLI, tells.
        unreachable = 0 if await _reachable(provider.engine_address) else unreachable + 1
    print("nixos provider: the Pulumi engine is gone; stopping", file=sys.stderr, flush=True)
    tasks = provider.cancel_all()
    closing = asyncio.ensure_future(provider.ctx.evaluator.aclose(timeout=ORPHAN_GRACE))
    await asyncio.wait([*tasks, closing], timeout=ORPHAN_GRACE)
    os._exit(0)


def main() -> None:
    # Secrets must never be printed; keep asyncssh's own logging quiet.
    import logging
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("asyncssh").setLevel(logging.ERROR)
    # Ctrl-C in a terminal reaches the whole process group. The engine then
    # calls Cancel, and a deployment that is activating rolls back and waits
    # for its supervisor; dying on the signal would leave the host to it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(serve(sys.argv[1:]))
    except KeyboardInterrupt:
        pass

