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


# The CLI's commands that never check the program's resources: what began early would only run until the
# provider stops (`refresh` reads the hosts, `destroy` removes them).
COMMANDS_WITHOUT_CHECKS = {"refresh", "destroy", "down", "dn"}
PULUMI_COMMANDS = COMMANDS_WITHOUT_CHECKS | {"preview", "pre", "up", "update", "watch", "import"}


def parent_argv() -> list[str]:
    """The command line of the process that started this one, where Linux's /proc tells; else nothing."""
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")[:-1]]
    except OSError:
        return []


def begins_early(parent: list[str]) -> bool:
    """Whether to begin the stack's plan before any Check: only for the Pulumi engine (a language host such as
    `pulumi-language-yaml` starts a plugin of its own to read the schema, with an engine address too; no Check
    follows there), and not for a command that checks nothing. Where the parent's command line is unknown,
    nothing begins before the first Check."""
    if not parent or "pulumi-language-" in os.path.basename(parent[0]):
        return False
    command = next((arg for arg in parent[1:] if arg in PULUMI_COMMANDS), None)
    return command not in COMMANDS_WITHOUT_CHECKS


def place() -> str:
    """Where the engine runs this plugin: the project's directory (its working directory) and name."""
    return json.dumps([os.getcwd(), os.environ.get("PULUMI_PROJECT", "")])


async def serve(argv: list[str]) -> None:
    engine_address = engine_address_from(argv)
    evaluator = Evaluator(EvaluationStore.default())
    if engine_address and begins_early(parent_argv()):
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
    closing = asyncio.ensure_future(provider.ctx.fleet.evaluator.aclose(timeout=ORPHAN_GRACE))
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

