"""A checked declaration's settings into the engine's models, and a recorded `secretFiles` output back into them."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from ..models import BinaryCache, Credentials, HealthCheck, InstallRequest, Remote
from ..target.secret_files import RecordedFile, SecretFile


def to_install_request(inst: dict[str, Any], remote: Remote, system_path: str, *, command: list[str],
                       disko_script: str | None, flake: str | None,
                       nix_opts: list[tuple[str, str]]) -> InstallRequest:
    return InstallRequest(
        remote=remote,
        system_path=system_path,
        command=tuple(inst.get("command") or command),
        disko_script=disko_script,
        flake=flake,
        phases=tuple(dict.fromkeys(inst.get("phases") or ())),
        kexec_url=inst.get("kexecUrl"),
        post_kexec_ssh_port=int(inst["sshPort"]) if inst.get("sshPort") is not None else None,
        build_on=inst.get("buildOn"),
        copy_host_keys=bool(inst.get("copyHostKeys")),
        substitute_on_destination=inst.get("substituteOnDestination", True) is not False,
        extra_files=tuple(sorted((inst.get("extraFiles") or {}).items())),
        disk_encryption_keys=tuple(sorted((inst.get("diskEncryptionKeys") or {}).items())),
        extra_args=tuple(inst.get("extraArgs") or ()),
        nix_options=tuple(nix_opts),
        timeout=_num(inst.get("timeout"), 3600),
    )


def parse_binary_cache(value: Any) -> Any:
    """Provider config arrives as JSON text when set with `pulumi config set`; as an object otherwise."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value  # Check reports it as not an object
    return value


def to_binary_cache(c: Any) -> BinaryCache | None:
    if not isinstance(c, dict) or not c.get("url"):
        return None
    return BinaryCache(url=str(c["url"]), public_key=str(c.get("publicKey")),
                       upload_url=c.get("uploadUrl") or None,
                       signing_key=c.get("signingKey") or None,
                       signing_key_file=c.get("signingKeyFile") or None)


def _num(v: Any, default: float) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def to_remote(c: dict[str, Any], *, host_key: str | None = None,
              default_private_key: str | None = None, default_user: str | None = None) -> Remote:
    creds = Credentials(
        private_key=c.get("privateKey"),
        private_key_password=c.get("privateKeyPassword"),
        password=c.get("password"),
        agent_socket_path=c.get("agentSocketPath"),
        sudo_password=c.get("sudoPassword"),
    )
    if creds.empty and default_private_key:
        creds = replace(creds, private_key=default_private_key)
    proxy = to_remote(c["proxy"], default_private_key=default_private_key) if c.get("proxy") else None
    return Remote(
        host=str(c["host"]),
        port=int(_num(c.get("port"), 22)),
        user=str(c.get("user") or default_user or "root"),
        credentials=creds,
        host_key=c.get("hostKey") or host_key,
        proxy=proxy,
        connect_timeout=_num(c.get("connectTimeout"), 15),
        retries=int(_num(c.get("retries"), 3)),
    )


def to_health_checks(checks: Any) -> tuple[HealthCheck, ...]:
    out = []
    for c in checks or []:
        out.append(HealthCheck(
            command=c.get("command"),
            http=c.get("http"),
            tcp=int(c["tcp"]) if c.get("tcp") is not None else None,
            host=c.get("host") or "127.0.0.1",
            timeout=_num(c.get("timeout"), 10),
            retries=int(_num(c.get("retries"), 3)),
            interval=_num(c.get("interval"), 2),
            name=c.get("name"),
        ))
    return tuple(out)


def nix_options(opts: Any) -> list[tuple[str, str]]:
    return [(o["name"], o["value"]) for o in (opts or [])]


def to_secret_files(files: Any) -> tuple[SecretFile, ...]:
    """The engine's model of checked, known secretFiles."""
    return tuple(SecretFile(
        path=e["path"], content=str(e["content"]).encode(), owner=e.get("owner") or "root",
        group=e.get("group") or "root", mode=e.get("mode") or "0400", stage=e.get("stage") or "before-activation",
        keep_on_destroy=bool(e.get("keepOnDestroy")),
    ) for e in (files or []))


def recorded_files(outputs: Any) -> tuple[RecordedFile, ...]:
    """What state says is on the host: the `secretFiles` output, hashes instead of contents."""
    out = []
    for e in outputs or []:
        if isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("contentHash"), str):
            out.append(RecordedFile(
                path=e["path"], content_hash=e["contentHash"], owner=e.get("owner") or "root",
                group=e.get("group") or "root", mode=e.get("mode") or "0400",
                stage=e.get("stage") or "before-activation", keep_on_destroy=bool(e.get("keepOnDestroy"))))
    return tuple(out)


def secret_files_output(records: tuple[RecordedFile, ...]) -> list[dict[str, Any]] | None:
    """The `secretFiles` output: each file's settings and the HMAC of its content, never the content."""
    if not records:
        return None
    return [{"path": r.path, "contentHash": r.content_hash, "owner": r.owner, "group": r.group, "mode": r.mode,
             "stage": r.stage, "keepOnDestroy": r.keep_on_destroy} for r in records]
