"""The gRPC ResourceProvider server the Pulumi engine talks to.

Every RPC turns its request into a resource call and the result (or failure)
back into protobuf. Errors reach the CLI as one human line; tracebacks go to
the provider's stderr (Pulumi's verbose logs), never to the user.
"""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, empty_pb2
from google.rpc import status_pb2
from pulumi.runtime.proto import engine_pb2, engine_pb2_grpc, plugin_pb2, provider_pb2, provider_pb2_grpc

from .. import provider_version
from ..engine.declaration import checks
from ..engine.declaration.error_text import describe
from ..engine.errors import EngineError
from ..engine.nix.evaluation import Evaluator
from ..engine.resources.fleet import Fleet
from . import functions, provider_config
from .context import Context
from .machine import NixosMachine
from .nix_profile import NixProfile
from .properties import from_struct, to_struct, without_secrets
from .resource import Changes, CheckFailed, PartialFailure
from .schema import SCHEMA_PATH

T = TypeVar("T")
Ctx = grpc.aio.ServicerContext[Any, Any]
# When the engine stops the plugin (SIGINT, then SIGKILL to the group 5 s later): up to this long for the
# evaluations still running to be killed and reaped (what finished is kept already).
STOP_GRACE = 2.0


def _type_of(urn: str, type_: str = "") -> str:
    if type_:
        return type_
    # urn:pulumi:stack::project::qualified$type::name
    return urn.split("::")[2].split("$")[-1] if urn.count("::") >= 3 else ""


class Provider(provider_pb2_grpc.ResourceProviderServicer):
    def __init__(self, engine_address: str | None, evaluator: Evaluator) -> None:
        self.engine_address = engine_address
        self._log_queue: asyncio.Queue[engine_pb2.LogRequest] | None = None
        self._log_task: asyncio.Task[None] | None = None
        # The engine starts provider plugins in the Pulumi project's directory;
        # relative flake references resolve against it (captured once, at start).
        self.ctx = Context(log=self._log, fleet=Fleet(project_dir=os.getcwd(), evaluator=evaluator))
        self.resources: dict[str, Any] = {
            "nixos:index:NixosMachine": NixosMachine(self.ctx),
            "nixos:index:NixProfile": NixProfile(self.ctx),
        }
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cancelled: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()

    # -- logging to the engine --------------------------------------------------

    async def start_logging(self) -> None:
        if not self.engine_address:
            return
        channel = grpc.aio.insecure_channel(self.engine_address)
        stub = engine_pb2_grpc.EngineStub(channel)
        self._log_queue = asyncio.Queue()

        async def pump() -> None:
            assert self._log_queue is not None
            while True:
                req = await self._log_queue.get()
                try:
                    await stub.Log(req)  # type: ignore[misc]
                except grpc.RpcError:
                    pass
                finally:
                    self._log_queue.task_done()

        self._log_task = asyncio.create_task(pump())

    def _log(self, severity: str, message: str, urn: str, ephemeral: bool) -> None:
        if self._log_queue is None:
            print(f"[{severity}] {message}", file=sys.stderr)
            return
        self._log_queue.put_nowait(engine_pb2.LogRequest(
            severity=engine_pb2.LogSeverity.Value(severity), message=message, urn=urn, ephemeral=ephemeral))

    # -- helpers ------------------------------------------------------------------

    def _resource(self, urn: str, type_: str = "") -> Any:
        t = _type_of(urn, type_)
        if t not in self.resources:
            raise EngineError(f"unknown resource type {t!r}")
        return self.resources[t]

    async def _guard(self, context: Ctx, fn: Callable[[], Awaitable[T]]) -> T:
        task = asyncio.current_task()
        if task:
            self._tasks.add(task)
        # The operation stops counting as in flight before its answer leaves: the engine may send SIGINT the moment
        # it has the answer, and that SIGINT must find the provider idle.
        try:
            try:
                return await fn()
            except PartialFailure as e:
                detail = provider_pb2.ErrorResourceInitFailed(
                    id=e.resource_id, properties=to_struct(e.outputs), inputs=to_struct(e.inputs), reasons=[str(e)])
                packed = any_pb2.Any()
                packed.Pack(detail)
                status = status_pb2.Status(code=grpc.StatusCode.UNKNOWN.value[0], message=str(e), details=[packed])
                context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
                code, message = grpc.StatusCode.UNKNOWN, str(e)
            except (EngineError, ValueError) as e:
                code, message = grpc.StatusCode.UNKNOWN, describe(e)
            except asyncio.CancelledError:
                code, message = grpc.StatusCode.CANCELLED, "the operation was cancelled"
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                code, message = (grpc.StatusCode.INTERNAL,
                                 f"internal error in the nixos provider: {type(e).__name__}: {e}")
        finally:
            if task:
                self._tasks.discard(task)
            await self._flush_logs()
        await context.abort(code, message)
        raise AssertionError("unreachable")

    async def _flush_logs(self) -> None:
        """Deliver queued diagnostics before the RPC answers: the engine may stop us right after."""
        if self._log_queue is not None:
            try:
                await asyncio.wait_for(self._log_queue.join(), timeout=10)
            except TimeoutError:
                pass

    # -- plugin RPCs ----------------------------------------------------------------

    async def GetPluginInfo(self, request: empty_pb2.Empty, context: Ctx) -> plugin_pb2.PluginInfo:
        return plugin_pb2.PluginInfo(version=provider_version())

    async def GetSchema(self, request: provider_pb2.GetSchemaRequest, context: Ctx,
                        ) -> provider_pb2.GetSchemaResponse:
        return provider_pb2.GetSchemaResponse(schema=SCHEMA_PATH.read_text())

    async def Handshake(self, request: provider_pb2.ProviderHandshakeRequest, context: Ctx,
                        ) -> provider_pb2.ProviderHandshakeResponse:
        if request.engine_address and not self.engine_address:
            self.engine_address = request.engine_address
            await self.start_logging()
        # root_directory/program_directory name the plugin's own directory here;
        # the Pulumi project is the working directory the engine started us in.
        return provider_pb2.ProviderHandshakeResponse(accept_secrets=True, accept_resources=True)

    async def CheckConfig(self, request: provider_pb2.CheckRequest, context: Ctx,
                          ) -> provider_pb2.CheckResponse:
        news = from_struct(request.news)
        return provider_pb2.CheckResponse(inputs=request.news, failures=_check_failures(provider_config.check(news), news))

    async def DiffConfig(self, request: provider_pb2.DiffRequest, context: Ctx) -> provider_pb2.DiffResponse:
        # A changed setting never replaces the provider: that would replace every machine it manages.
        changed = provider_config.changed(from_struct(request.olds), from_struct(request.news))
        return provider_pb2.DiffResponse(
            changes=provider_pb2.DiffResponse.DIFF_SOME if changed else provider_pb2.DiffResponse.DIFF_NONE,
            diffs=changed)

    async def Configure(self, request: provider_pb2.ConfigureRequest, context: Ctx,
                        ) -> provider_pb2.ConfigureResponse:
        values = from_struct(request.args) if request.HasField("args") else {}
        for full, value in request.variables.items():
            values.setdefault(full.split(":")[-1], value)
        self.ctx.fleet.configure(provider_config.parse(values))
        return provider_pb2.ConfigureResponse(acceptSecrets=True, supportsPreview=True, acceptResources=True)

    def cancel_all(self) -> list[asyncio.Task[Any]]:
        """Cancel every operation once; return them, to wait for."""
        tasks = list(self._tasks)
        for task in tasks:
            # gRPC cancels an operation itself when the engine goes away; that counts too.
            if task not in self._cancelled and not task.cancelling():
                self._cancelled.add(task)
                task.cancel()
        return tasks

    def interrupted(self) -> None:
        """SIGINT. The engine sends it to the plugin's process group to stop a plugin it is done with (and SIGKILL
        5 s later); a Ctrl-C in a terminal sends it to the whole group too. With an operation in flight it is
        that Ctrl-C: the engine calls Cancel, and a deployment rolls back as it should, so the signal is ignored.
        With none, the provider stops at once (its evaluations ahead are cancelled, their Nix processes killed)
        instead of making every `pulumi` command wait those 5 s."""
        if self._tasks:
            return
        stopping = asyncio.ensure_future(self._stop())
        stopping.add_done_callback(lambda _: os._exit(0))

    async def _stop(self) -> None:
        await self.ctx.fleet.evaluator.aclose(timeout=STOP_GRACE)
        await self._flush_logs()

    async def Cancel(self, request: empty_pb2.Empty, context: Ctx) -> empty_pb2.Empty:
        # Each operation is cancelled once: a deployment that is activating
        # then tells its supervisor to roll back and waits for it (a second
        # cancellation would cut that short and leave the state ahead of the host).
        self.cancel_all()
        return empty_pb2.Empty()

    # -- resource RPCs ----------------------------------------------------------------

    async def Check(self, request: provider_pb2.CheckRequest, context: Ctx,
                    ) -> provider_pb2.CheckResponse:
        async def run() -> provider_pb2.CheckResponse:
            res = self._resource(request.urn, request.type)
            try:
                checked = await res.check(request.urn, from_struct(request.olds), news := from_struct(request.news))
            except CheckFailed as e:
                return provider_pb2.CheckResponse(inputs=request.news, failures=_check_failures(e.failures, news))
            return provider_pb2.CheckResponse(inputs=to_struct(checked))
        return await self._guard(context, run)

    async def Diff(self, request: provider_pb2.DiffRequest, context: Ctx,
                   ) -> provider_pb2.DiffResponse:
        async def run() -> provider_pb2.DiffResponse:
            res = self._resource(request.urn, request.type)
            result: Changes = res.diff(from_struct(request.olds), from_struct(request.news))
            for ignored in request.ignoreChanges:
                result.detailed.pop(ignored, None)
            kinds = provider_pb2.PropertyDiff.Kind
            return provider_pb2.DiffResponse(
                changes=provider_pb2.DiffResponse.DIFF_SOME if result.changed else provider_pb2.DiffResponse.DIFF_NONE,
                replaces=result.replaces, diffs=sorted({k.split(".")[0] for k in result.detailed}),
                detailedDiff={k: provider_pb2.PropertyDiff(kind=kinds.Value(kind), inputDiff=True)
                              for k, kind in result.detailed.items()},
                hasDetailedDiff=True, deleteBeforeReplace=result.delete_before_replace)
        return await self._guard(context, run)

    async def Create(self, request: provider_pb2.CreateRequest, context: Ctx,
                     ) -> provider_pb2.CreateResponse:
        async def run() -> provider_pb2.CreateResponse:
            res = self._resource(request.urn, request.type)
            ident, outputs = await res.create(request.urn, from_struct(request.properties), request.preview)
            return provider_pb2.CreateResponse(id=ident, properties=to_struct(outputs))
        return await self._guard(context, run)

    async def Update(self, request: provider_pb2.UpdateRequest, context: Ctx,
                     ) -> provider_pb2.UpdateResponse:
        async def run() -> provider_pb2.UpdateResponse:
            res = self._resource(request.urn, request.type)
            outputs = await res.update(request.urn, request.id, from_struct(request.olds), from_struct(request.news),
                                       request.preview)
            return provider_pb2.UpdateResponse(properties=to_struct(outputs))
        return await self._guard(context, run)

    async def Read(self, request: provider_pb2.ReadRequest, context: Ctx,
                   ) -> provider_pb2.ReadResponse:
        async def run() -> provider_pb2.ReadResponse:
            res = self._resource(request.urn, request.type)
            ident, outputs, new_inputs = await res.read(request.urn, request.id, from_struct(request.properties),
                                                        from_struct(request.inputs))
            return provider_pb2.ReadResponse(id=ident, properties=to_struct(outputs), inputs=to_struct(new_inputs))
        return await self._guard(context, run)

    async def Delete(self, request: provider_pb2.DeleteRequest, context: Ctx,
                     ) -> empty_pb2.Empty:
        async def run() -> empty_pb2.Empty:
            res = self._resource(request.urn, request.type)
            await res.delete(request.urn, request.id, from_struct(request.properties))
            return empty_pb2.Empty()
        return await self._guard(context, run)

    # -- functions ------------------------------------------------------------------------

    async def Invoke(self, request: provider_pb2.InvokeRequest, context: Ctx,
                     ) -> provider_pb2.InvokeResponse:
        async def run() -> provider_pb2.InvokeResponse:
            try:
                result = await functions.invoke(self.ctx, request.tok, args := from_struct(request.args))
            except CheckFailed as e:
                return provider_pb2.InvokeResponse(failures=_check_failures(e.failures, args))
            return _invoke_result(result)
        return await self._guard(context, run)


def _check_failures(failures: checks.Failures, given: Any) -> list[provider_pb2.CheckFailure]:
    """Each failure, with any value the program marked secret taken out of its reason (a rule may quote the value
    it refuses)."""
    return [provider_pb2.CheckFailure(property=p, reason=without_secrets(r, given)) for p, r in failures.items]


def _invoke_result(value: dict[str, Any]) -> provider_pb2.InvokeResponse:
    resp = provider_pb2.InvokeResponse()
    getattr(resp, "return").CopyFrom(to_struct(value))  # `return` is a Python keyword
    return resp
