"""nixos-anywhere's command line and environment for one install."""

from __future__ import annotations

import os

from ..errors import EngineError
from ..models import InstallRequest
from .files import InstallFiles


def nixos_anywhere_argv(req: InstallRequest, files: InstallFiles) -> list[str]:
    """The full command line. It holds paths to the secret files, never their contents."""
    r = req.remote
    argv = [*req.command, "--target-host", f"{r.user}@{r.host}", "--ssh-port", str(r.port)]
    # The connection's own limits, so a host that stops answering fails the
    # install instead of hanging it (the same keepalive as our asyncssh).
    for option in (f"ConnectTimeout={max(1, round(r.connect_timeout))}", "ServerAliveInterval=10",
                   "ServerAliveCountMax=3"):
        argv += ["--ssh-option", option]
    if files.identity is not None:
        argv += ["-i", str(files.identity)]
    elif r.credentials.password:
        argv += ["--env-password"]  # the password travels in SSHPASS
    if req.disko_script is not None:
        argv += ["--store-paths", req.disko_script, req.system_path]
    elif req.flake is not None:
        argv += ["--flake", req.flake]
    else:
        raise EngineError("nixos-anywhere needs a prebuilt disko script with the system, or a flake")
    if req.phases:
        argv += ["--phases", ",".join(req.phases)]
    if req.kexec_url:
        argv += ["--kexec", req.kexec_url]
    if req.post_kexec_ssh_port is not None:
        argv += ["--post-kexec-ssh-port", str(req.post_kexec_ssh_port)]
    if req.build_on:
        argv += ["--build-on", req.build_on]
    if req.copy_host_keys:
        argv += ["--copy-host-keys"]
    if not req.substitute_on_destination:
        argv += ["--no-substitute-on-destination"]
    if files.extra_files is not None:
        argv += ["--extra-files", str(files.extra_files)]
    for dest, local in files.disk_keys:
        argv += ["--disk-encryption-keys", dest, str(local)]
    for name, value in req.nix_options:
        argv += ["--option", name, value]
    return [*argv, *req.extra_args]


def child_env(req: InstallRequest) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SSHPASS", "SSH_PRIVATE_KEY")}
    creds = req.remote.credentials
    if creds.password and not creds.private_key:
        env["SSHPASS"] = creds.password  # read by `sshpass -e`, never in argv
    if creds.agent_socket_path:
        env["SSH_AUTH_SOCK"] = creds.agent_socket_path
    return env
