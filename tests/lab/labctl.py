#!/usr/bin/env python3
"""labctl: start, stop, reboot and inspect lab hosts.

A lab host is an OpenSSH server on its own loopback address, running inside
its own mount namespace with a private /nix, /run, /tmp, /root and (overlaid) /etc.  A
deployer that pushes a closure to it really crosses stores, and activation
really changes what runs there.  See docs/lab.md.

Usage:
    labctl.py up [--hosts N] [--mode nixos|bare|systemd] [--release trixie|sid] [--lab-dir DIR] [--subnet K]
    labctl.py status [--lab-dir DIR]
    labctl.py down [--lab-dir DIR]
    labctl.py reboot NAME [--lab-dir DIR]
    labctl.py kexec NAME [--lab-dir DIR]

`up` writes DIR/hosts.json describing each host (name, address, port, user,
privateKeyPath, hostKey, stateDir, httpPort, mode, release) for tests, examples
and the demo.  Needs root: it creates mount namespaces.

`--mode systemd` hosts boot a Debian root with systemd as PID 1 under
systemd-nspawn instead (see "systemd hosts" below and docs/lab.md).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

LAB_FLAKE = Path(__file__).resolve().parent
REPO_ROOT = LAB_FLAKE.parent.parent
DEFAULT_LAB_DIR = Path(os.environ.get("LAB_DIR", REPO_ROOT / ".lab"))
SSH_PORT = 2222
HTTP_PORT = 8080
USER_NAME = "alice"
USER_UID = 1500
USER_PASSWORD = "alice-lab-password"
# A second non-root user whose sudo rule asks for its password (alice's does
# not): the one connection.sudoPassword is for. Trusted by the host's
# nix-daemon, so a NixProfile of another user can be pushed as it.
SUDO_USER_NAME = "bob"
SUDO_USER_UID = 1501
SUDO_USER_PASSWORD = "bob-sudo-password"
NIX = ["nix", "--extra-experimental-features", "nix-command flakes", "--option", "substituters", ""]
# A lab host's own Nix settings (its /etc/nix/nix.conf), the same ones
# scripts/env.sh gives the deployer: the host has no nixbld group, and the
# lab's derivations run the machine's /bin/sh, which a sandbox would hide.
NIX_CONF = "build-users-group =\nsandbox = false\nsubstituters =\nexperimental-features = nix-command flakes\n"
# Namespace hosts only (the user bob exists there alone).
NIX_CONF_TRUSTING_SUDO_USER = NIX_CONF + f"trusted-users = root {SUDO_USER_NAME}\n"


@dataclass(frozen=True)
class LabHost:
    name: str
    address: str
    port: int
    user: str
    privateKeyPath: str
    hostKey: str
    stateDir: str
    httpPort: int
    mode: str
    nonRootUser: str = USER_NAME
    nonRootPassword: str = USER_PASSWORD
    passwordSudoUser: str = SUDO_USER_NAME  # sudo asks it for passwordSudoPassword (namespace hosts only)
    passwordSudoPassword: str = SUDO_USER_PASSWORD
    release: str = ""  # systemd hosts: the Debian release of their root (trixie, sid)

    @property
    def state(self) -> Path:
        return Path(self.stateDir)


class LabError(RuntimeError):
    pass


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc  # type: ignore[no-any-return]


# -- namespaces and processes -------------------------------------------------


def _ns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def processes_in_namespace(ns: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ns_of(int(entry)) == ns:
            pids.append(int(entry))
    return pids


def holder_pid(state: Path) -> int | None:
    try:
        pid = int((state / "holder.pid").read_text())
    except (OSError, ValueError):
        return None
    recorded = (state / "ns").read_text().strip() if (state / "ns").exists() else None
    return pid if _ns_of(pid) is not None and _ns_of(pid) == recorded else None


def nsenter(state: Path, cmd: list[str]) -> list[str]:
    if is_systemd_state(state):
        return container_enter(state, cmd)
    pid = holder_pid(state)
    if pid is None:
        raise LabError(f"lab host at {state} is not running")
    return ["nsenter", f"--mount=/proc/{pid}/ns/mnt", "--", *cmd]


def _sees_host_store(pid: int, state: Path) -> bool:
    """Is the host's own store (<state>/nix) mounted in pid's namespace?

    A namespace's id is reused once the namespace is gone, so a stale `ns`
    file can name somebody else's namespace (another lab, a test leg); only
    one that mounts this host's store is this host's.
    """
    # /proc/PID/root is the process's own view of the file system, so its /nix
    # is the directory its namespace mounts there.
    try:
        theirs = os.stat(f"/proc/{pid}/root/nix")
        ours = os.stat(state / "nix")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def kill_namespace(state: Path, keep_holder: bool) -> None:
    ns_file = state / "ns"
    if not ns_file.exists():
        return
    ns = ns_file.read_text().strip()
    holder = holder_pid(state)
    for _ in range(50):
        # Every pass checks each process again: once the last member dies the
        # id is free, and a namespace made a moment later (another host's,
        # another test leg's) can carry it; its processes are not ours to kill.
        victims = [
            p for p in processes_in_namespace(ns)
            if not (keep_holder and p == holder) and _sees_host_store(p, state)
        ]
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise LabError(f"processes in {ns} would not die")


# -- host lifecycle -----------------------------------------------------------


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _client_key(lab_dir: Path) -> Path:
    key = lab_dir / "keys" / "id_ed25519"
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pulumi-nixos-lab", "-f", str(key)])
    return key


def build_system(attr: str, flake: Path = LAB_FLAKE) -> str:
    ref = f"path:{flake}#nixosConfigurations.{attr}.config.system.build.toplevel"
    out = run([*NIX, "build", "--no-link", "--json", ref]).stdout
    return str(json.loads(out)[0]["outputs"]["out"])


def copy_closure_into(state: Path, store_path: str) -> None:
    """Copy a closure from the deployer's store into a lab host's store."""
    closure = run(["nix-store", "-qR", store_path]).stdout.split()
    export = subprocess.Popen(["nix-store", "--export", *closure], stdout=subprocess.PIPE)
    imp = subprocess.run(nsenter(state, ["nix-store", "--import"]), stdin=export.stdout, capture_output=True, text=True)
    export.wait()
    if export.returncode != 0 or imp.returncode != 0:
        raise LabError(f"copying {store_path} into lab host failed (export {export.returncode}, "
                       f"import {imp.returncode}): {imp.stderr.strip()}")


def _prepare_etc(state: Path, host: LabHost, client_pub: str, mode: str) -> None:
    etc = state / "etc-upper"
    for sub in ("etc-upper", "etc-work", "nix", "run", "boot"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "root").mkdir(mode=0o700, exist_ok=True)
    (etc / "ssh").mkdir(parents=True, exist_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host.name}", "-f", str(etc / "ssh" / "ssh_host_ed25519_key")])
    _write(
        etc / "ssh" / "sshd_config",
        "\n".join(
            [
                # No Port line: sshd adds every Port it is given, and the lab
                # passes the active port with -o Port=N when it starts sshd.
                f"ListenAddress {host.address}",
                "HostKey /etc/ssh/ssh_host_ed25519_key",
                "PermitRootLogin yes",
                "PasswordAuthentication yes",
                "KbdInteractiveAuthentication no",
                "AuthorizedKeysFile /etc/lab/authorized_keys/%u",
                "UsePAM no",
                "StrictModes no",
                "PidFile /run/sshd.pid",
                "AllowTcpForwarding yes",
                "MaxStartups 100:30:200",
                "MaxSessions 50",
                "Subsystem sftp internal-sftp",
                "",
            ]
        ),
    )
    _write(etc / "lab" / "authorized_keys" / "root", client_pub)
    _write(etc / "lab" / "authorized_keys" / USER_NAME, client_pub)
    _write(etc / "lab" / "authorized_keys" / SUDO_USER_NAME, client_pub)
    _write(etc / "lab" / "ssh-port-default", str(host.port))
    _write(
        etc / "lab" / "host.json",
        json.dumps({"name": host.name, "address": host.address, "httpPort": host.httpPort, "sshPort": host.port}),
    )
    _write(etc / "sudoers.d" / "lab-alice", f"{USER_NAME} ALL=(ALL) NOPASSWD: ALL\n", 0o440)
    _write(etc / "sudoers.d" / "lab-bob", f"{SUDO_USER_NAME} ALL=(ALL) ALL\n", 0o440)
    _write(etc / "nix" / "nix.conf", NIX_CONF_TRUSTING_SUDO_USER)
    if mode == "nixos":
        _write(
            etc / "os-release",
            'NAME=NixOS\nID=nixos\nVERSION="24.05 (Lab)"\nVERSION_ID="24.05"\nPRETTY_NAME="NixOS 24.05 (Lab)"\n',
        )
        _write(etc / "NIXOS", "")


def _start_holder(state: Path) -> None:
    # The state directory is passed as $1, never pasted into the script.
    script = (
        # fd 3 is opened before /tmp is replaced, so "ready" reaches a state
        # directory that itself lives under /tmp.
        'set -e; s=$1; exec 3>"$s/ready"; '
        'mount --bind "$s/nix" /nix; '
        'mkdir -p "$s/boot"; mount --bind "$s/boot" /boot; '
        'mount --bind "$s/run" /run; '
        'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$s/etc-upper,workdir=$s/etc-work" /etc; '
        # root's own home, as on any machine: not the deployer's /root, whose
        # shell start-up files (a pyenv init here) sshd's bash would run for
        # every command, and whose ~/.nix-profile all hosts would share.
        'mount --bind "$s/root" /root; '
        # Disk encryption keys land in /tmp: it must be the host's own. (Last:
        # a state directory under /tmp is out of sight after this.)
        "mount -t tmpfs -o mode=1777 lab-tmp /tmp; "
        "mkdir -p /run/sshd /run/lab; chmod 0755 /run/sshd; "
        'echo up >&3; exec 3>&-; exec sleep infinity'
    )
    (state / "ready").unlink(missing_ok=True)
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", script, "lab-host", str(state)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(state / "holder.log", "w"),
        start_new_session=True,
    )
    for _ in range(100):
        if (state / "ready").exists() and (state / "ready").read_text() == "up\n":
            break
        if proc.poll() is not None:
            raise LabError(f"lab namespace failed: {(state / 'holder.log').read_text()}")
        time.sleep(0.05)
    else:
        raise LabError("lab namespace did not come up")
    ns = _ns_of(proc.pid)
    assert ns is not None
    (state / "holder.pid").write_text(str(proc.pid))
    (state / "ns").write_text(ns)


def _start_nix_daemon(state: Path) -> None:
    # nix-daemon may move itself into a mount namespace of its own (to make
    # the store writable), where kill_namespace cannot see it; it runs in its
    # own process group, which stop_nix_daemon kills whole.
    proc = subprocess.Popen(
        nsenter(state, ["nix-daemon"]),
        stdin=subprocess.DEVNULL,
        stdout=open(state / "nix-daemon.log", "a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    (state / "nix-daemon.pid").write_text(str(proc.pid))


def stop_nix_daemon(state: Path) -> None:
    try:
        pgid = int((state / "nix-daemon.pid").read_text())
    except (OSError, ValueError):
        return
    # Only while the number is still this host's daemon: a daemon that died
    # by itself leaves a number the machine hands out again, maybe to the
    # leader of a whole test run's process group.
    try:
        ours = b"nix-daemon" in Path(f"/proc/{pgid}/cmdline").read_bytes()
    except OSError:
        ours = False
    if ours:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    (state / "nix-daemon.pid").unlink(missing_ok=True)


def wait_for_port(address: str, port: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


INSTALLER = "/run/lab-installer"
INSTALLER_OS_RELEASE = (
    'NAME=NixOS\nID=nixos\nVARIANT_ID=installer\nVERSION="24.05 (Lab installer)"\n'
    'VERSION_ID="24.05"\nPRETTY_NAME="NixOS 24.05 (Lab installer)"\n'
)


def _power_cycle(state: Path) -> None:
    """Everything that ran stops; what lived only in memory (/run, the installer) is gone."""
    stop_nix_daemon(state)
    kill_namespace(state, keep_holder=True)
    # The disk's own /etc/os-release comes back when the installer is gone.
    script = (
        f'if [ -e {INSTALLER}/os-release.disk ] || [ -L {INSTALLER}/os-release.disk ]; then '
        f'rm -f /etc/os-release; cp -P {INSTALLER}/os-release.disk /etc/os-release; fi; '
        f"rm -rf {INSTALLER} /run/lab /run/sshd.pid /run/current-system /run/booted-system; "
        "mkdir -p /run/lab /run/sshd"
    )
    run(nsenter(state, ["sh", "-c", script]))


def boot(host: LabHost) -> None:
    """Start the host from its disk, as a reboot would: the boot-default
    generation when one is installed, else the plain distribution (bare)."""
    if host.mode == "systemd":
        reboot_container(host)
        return
    state = host.state
    _power_cycle(state)
    in_ns = lambda cmd: run(nsenter(state, cmd))  # noqa: E731
    _start_nix_daemon(state)
    default = state / "etc-upper" / "lab" / "boot-default"
    if default.is_symlink():
        # The boot loader's choice (a one-shot entry, else the default), then the boot-time activation.
        in_ns(["/bin/sh", str(SYSTEMD_UNITS / "lab-boot.sh")])
    else:
        in_ns(["/usr/sbin/sshd", "-f", "/etc/ssh/sshd_config", "-o", f"Port={host.port}"])
    if not wait_for_port(host.address, host.port):
        raise LabError(f"{host.name}: sshd did not come up on {host.address}:{host.port}")


def kexec(host: LabHost) -> None:
    """Restart the host into a NixOS installer running from memory, as
    nixos-anywhere's kexec phase does: /etc/os-release says VARIANT_ID=installer,
    the installer keeps the machine's SSH host key (the kexec image carries
    it over) and root's authorized keys, and the disk is left alone."""
    if host.mode == "systemd":
        raise LabError(f"{host.name}: kexec is for namespace hosts (--mode bare), not systemd hosts")
    state = host.state
    _power_cycle(state)
    in_ns = lambda cmd, **kw: run(nsenter(state, cmd), **kw)  # noqa: E731
    in_ns(["mkdir", "-p", f"{INSTALLER}/ssh"])
    in_ns(["sh", "-c", "if [ -f /etc/ssh/ssh_host_ed25519_key ]; then "
                       f"cp -a /etc/ssh/ssh_host_ed25519_key /etc/ssh/ssh_host_ed25519_key.pub {INSTALLER}/ssh/; "
                       f'else ssh-keygen -q -t ed25519 -N "" -f {INSTALLER}/ssh/ssh_host_ed25519_key; fi'])
    in_ns(["cp", "-P", "/etc/os-release", f"{INSTALLER}/os-release.disk"])
    in_ns(["sh", "-c", 'rm -f /etc/os-release && cat > /etc/os-release'], input=INSTALLER_OS_RELEASE)
    config = (state / "etc-upper" / "ssh" / "sshd_config").read_text().replace(
        "HostKey /etc/ssh/ssh_host_ed25519_key", f"HostKey {INSTALLER}/ssh/ssh_host_ed25519_key"
    ).replace("PidFile /run/sshd.pid", f"PidFile {INSTALLER}/sshd.pid")
    in_ns(["sh", "-c", f"cat > {INSTALLER}/sshd_config"], input=config)
    _start_nix_daemon(state)
    in_ns(["/usr/sbin/sshd", "-f", f"{INSTALLER}/sshd_config", "-o", f"Port={host.port}"])
    if not wait_for_port(host.address, host.port):
        raise LabError(f"{host.name}: the installer's sshd did not come up on {host.address}:{host.port}")


def find_host(lab_dir: Path, address: str, port: int) -> LabHost:
    for host in load_hosts(lab_dir):
        if host.address == address and host.port == port:
            return host
    raise LabError(f"no lab host at {address}:{port} in {lab_dir / 'hosts.json'}")


def _fresh_state(lab_dir: Path, name: str, address: str) -> tuple[Path, Path]:
    """An empty state directory for a new host (stopping an old one of that
    name) and the lab's client key."""
    state = lab_dir / "hosts" / name
    if state.exists():
        stop_host(state)
    if wait_for_port(address, SSH_PORT, timeout=0.2):
        raise LabError(f"{address}:{SSH_PORT} is already in use (a lab from another directory still running?)")
    state.mkdir(parents=True)
    return state, _client_key(lab_dir)


def start_host(lab_dir: Path, name: str, address: str, mode: str, base_system: str | None) -> LabHost:
    state, key = _fresh_state(lab_dir, name, address)
    host = LabHost(
        name=name,
        address=address,
        port=SSH_PORT,
        user="root",
        privateKeyPath=str(key),
        hostKey="",
        stateDir=str(state),
        httpPort=HTTP_PORT,
        mode=mode,
    )
    _prepare_etc(state, host, Path(f"{key}.pub").read_text(), mode)
    pub = (state / "etc-upper" / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()
    host = LabHost(**{**asdict(host), "hostKey": f"{pub[0]} {pub[1]}"})
    _start_holder(state)
    run(nsenter(state, ["useradd", "-M", "-d", f"/run/home/{USER_NAME}", "-s", "/bin/sh", "-u", str(USER_UID), USER_NAME]))
    run(nsenter(state, ["useradd", "-M", "-d", f"/run/home/{SUDO_USER_NAME}", "-s", "/bin/sh",
                        "-u", str(SUDO_USER_UID), SUDO_USER_NAME]))
    # chpasswd hashes the password into the host's own /etc/shadow (the
    # overlay), which the machine's real sudo checks through PAM.
    run(nsenter(state, ["chpasswd"]), input=f"{USER_NAME}:{USER_PASSWORD}\n{SUDO_USER_NAME}:{SUDO_USER_PASSWORD}\n")
    if mode == "nixos":
        assert base_system is not None
        copy_closure_into(state, base_system)
        run(nsenter(state, ["nix-env", "-p", "/nix/var/nix/profiles/system", "--set", base_system]))
        run(nsenter(state, [f"{base_system}/bin/switch-to-configuration", "boot"]))
    boot(host)
    return host


def stop_host(state: Path) -> None:
    if is_systemd_state(state):
        stop_container(state)
    stop_nix_daemon(state)
    kill_namespace(state, keep_holder=False)
    pid = holder_pid(state)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(state, ignore_errors=True)


# -- systemd hosts ------------------------------------------------------------
#
# A systemd host boots a Debian root (scripts/release-root.sh: trixie has Nix
# 2.26, sid 2.34) with systemd as PID 1 under systemd-nspawn.  The root is
# shared and never written: --volatile=overlay puts a tmpfs over it, so what
# the running system changes in /etc, /var or /tmp is gone at the next boot,
# as on a machine whose /etc is generated.  What a disk would keep is bound in
# from the host's state directory:
#
#   <state>/nix                          -> /nix (its own store and profiles)
#   <state>/etc-upper/lab                -> /etc/lab (host.json, ports, keys, boot-default)
#   <state>/etc-upper/ssh/ssh_host_*     -> /etc/ssh/ssh_host_ed25519_key{,.pub}
#   <state>/etc-upper/ssh/sshd_config.d/lab.conf -> /etc/ssh/sshd_config.d/lab.conf
#   <state>/etc-upper/nix/nix.conf       -> /etc/nix/nix.conf
#   <state>/etc-upper/hostname           -> /etc/hostname
#   tests/lab/systemd/*                  -> lab-boot.service and drop-ins for
#                                           multi-user.target and ssh.service
#
# The container shares the machine's network; its sshd listens on the host's
# own loopback address.  At boot, lab-boot.service activates the boot-default
# generation (NixOS's stage 2), and switch-to-configuration manages the lab
# service and Debian's ssh.service through systemctl.

DEFAULT_RELEASE = "trixie"
SYSTEMD_UNITS = LAB_FLAKE / "systemd"
RELEASE_ROOT_SCRIPT = REPO_ROOT / "scripts" / "release-root.sh"
CONTAINER_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 60.0
POWEROFF_TIMEOUT = 20.0


def systemd_unavailable() -> str | None:
    """Why systemd hosts cannot run on this machine, or None when they can."""
    if os.geteuid() != 0:
        return "systemd hosts need root (systemd-nspawn)"
    if shutil.which("systemd-nspawn") is None:
        return "systemd-nspawn is not installed (Debian package systemd-container)"
    if _cgroup2_mount() is None:
        return "no cgroup2 hierarchy is mounted (the container's systemd needs one)"
    return None


def release_root(release: str) -> Path:
    """The Debian root for a release, built by scripts/release-root.sh on first use."""
    out = run(["bash", str(RELEASE_ROOT_SCRIPT), release]).stdout.strip().splitlines()
    if not out:
        raise LabError(f"release-root.sh {release} printed no path")
    return Path(out[-1])


def is_systemd_state(state: Path) -> bool:
    return (state / "nspawn.json").exists()


def _machine_name(state: Path) -> str:
    # Unique per state directory: nspawn keeps per-machine files in the
    # machine's /run (e.g. /run/systemd/nspawn/propagate/<name>).
    digest = hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:8]
    return f"lab-{state.name}-{digest}"


def _cgroup2_mount() -> Path | None:
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "cgroup2":
                return Path(fields[1])
    return None


def _container_cgroup(state: Path) -> Path:
    """A cgroup of the container's own: nspawn puts its payload under the
    cgroup it runs in, and two containers must never share one."""
    mount = _cgroup2_mount()
    if mount is None:
        raise LabError("no cgroup2 hierarchy is mounted")
    own = ""
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                own = line[3:].strip().lstrip("/")
    return mount / own / "pulumi-nixos-lab" / _machine_name(state)


def _remove_cgroup(path: Path) -> None:
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            sub.rmdir()
        except OSError:
            pass
    for empty in (path, path.parent):  # the container's cgroup, then pulumi-nixos-lab when empty
        try:
            empty.rmdir()
        except OSError:
            pass


def _pid_alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and has exited
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _nspawn_record(state: Path) -> dict[str, object] | None:
    try:
        record: dict[str, object] = json.loads((state / "nspawn.json").read_text())
    except (OSError, ValueError):
        return None
    return record


def _power_pid(state: Path) -> int | None:
    """The host's "power supply": the wrapper that runs its systemd-nspawn, again after a reboot."""
    record = _nspawn_record(state)
    if record is None or not isinstance(record.get("pid"), int):
        return None
    pid = record["pid"]
    assert isinstance(pid, int)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # The pid is this host's wrapper, not a recycled number.
    if not _pid_alive(pid) or f"--machine={record.get('machine')}".encode() not in cmdline:
        return None
    return pid


def _nspawn_pid(state: Path) -> int | None:
    """The host's systemd-nspawn now (None while it is down, or between a reboot and the next boot)."""
    power = _power_pid(state)
    if power is None:
        return None
    try:
        children = Path(f"/proc/{power}/task/{power}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            argv0 = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if argv0.endswith(b"systemd-nspawn"):
            return int(child)
    return None


def container_init_pid(state: Path) -> int | None:
    """The container's PID 1 (systemd), as the machine sees it, or None when it is not running."""
    nspawn = _nspawn_pid(state)
    if nspawn is None:
        return None
    try:
        children = Path(f"/proc/{nspawn}/task/{nspawn}/children").read_text().split()
    except OSError:
        return None
    for child in children:
        try:
            status = Path(f"/proc/{child}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("NSpid:") and line.split()[-1] == "1" and len(line.split()) > 2:
                return int(child)
    return None


def container_enter(state: Path, cmd: list[str]) -> list[str]:
    """argv running cmd inside a systemd host (its mount, PID, UTS and IPC namespaces), with a clean environment."""
    pid = container_init_pid(state)
    if pid is None:
        raise LabError(f"systemd lab host at {state} is not running")
    return ["nsenter", f"--target={pid}", "--mount", "--uts", "--ipc", "--pid", "--",
            "env", "-i", f"PATH={CONTAINER_PATH}", "LC_ALL=C.UTF-8", "HOME=/root", *cmd]


def trust_cache(host: LabHost, url: str, public_key: str) -> None:
    """Make a host substitute from url, trusting public_key, through its own nix.conf: as NixOS hosts trust the
    public cache, not as a deployer's `--option` would.

    Written in place, on the host's disk: the running host sees the file by its inode (a namespace host's overlay
    has it in its upper layer, a systemd host has it bound), and a systemd host keeps it across reboots.
    """
    conf = host.state / "etc-upper" / "nix" / "nix.conf"
    kept = [line for line in conf.read_text().splitlines()
            if not line.startswith(("substituters", "trusted-public-keys"))]
    with open(conf, "r+") as f:
        f.write("\n".join([*kept, f"substituters = {url}", f"trusted-public-keys = {public_key}"]) + "\n")
        f.truncate()


# Where a misrouted SSH connection goes: a loopback address no lab host or service listens on.
NOWHERE = "127.0.0.254"


def misroute(host: LabHost, address: str) -> None:
    """From host, SSH to address is refused, as a name that resolves into another network would be; the deployer
    still reaches address. Its SSH client's own configuration sends it to NOWHERE, until the host reboots."""
    run(nsenter(host.state, ["sh", "-c", r'printf "\nHost %s\n    HostName %s\n" "$1" "$2" >> /etc/ssh/ssh_config',
                             "sh", address, NOWHERE]))


def add_password_sudo_user(host: LabHost) -> None:
    """Give a running systemd host the user bob whose sudo asks for his password, as namespace hosts have.

    Systemd hosts serve root only unless a test asks for this: their /etc is
    volatile, so the user lasts until the host reboots.
    """
    if host.mode != "systemd":
        return  # namespace hosts have bob from the start
    state = host.state
    _write(state / "etc-upper" / "lab" / "authorized_keys" / SUDO_USER_NAME,
           (state / "etc-upper" / "lab" / "authorized_keys" / "root").read_text())
    run(nsenter(state, ["useradd", "-M", "-d", f"/run/home/{SUDO_USER_NAME}", "-s", "/bin/sh",
                        "-u", str(SUDO_USER_UID), SUDO_USER_NAME]))
    run(nsenter(state, ["chpasswd"]), input=f"{SUDO_USER_NAME}:{SUDO_USER_PASSWORD}\n")
    run(nsenter(state, ["sh", "-c", 'printf "%s\\n" "$1" > /etc/sudoers.d/lab-bob && chmod 0440 /etc/sudoers.d/lab-bob',
                        "sh", f"{SUDO_USER_NAME} ALL=(ALL) ALL"]))


def _prepare_systemd_state(state: Path, host: LabHost, client_pub: str) -> None:
    etc = state / "etc-upper"
    (state / "nix").mkdir(parents=True, exist_ok=True)
    (state / "boot").mkdir(parents=True, exist_ok=True)  # the disk's /boot: GRUB's grub.cfg and grubenv
    (etc / "ssh").mkdir(parents=True, exist_ok=True)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{host.name}",
         "-f", str(etc / "ssh" / "ssh_host_ed25519_key")])
    # Debian's sshd_config includes sshd_config.d/*.conf first, and the first
    # value of a keyword wins.  No Port line: ssh.service passes the active
    # generation's port with -o Port=N (tests/lab/systemd/ssh.conf).
    _write(
        etc / "ssh" / "sshd_config.d" / "lab.conf",
        "\n".join([
            f"ListenAddress {host.address}",
            "HostKey /etc/ssh/ssh_host_ed25519_key",
            "PermitRootLogin yes",
            "PasswordAuthentication no",
            "AuthorizedKeysFile /etc/lab/authorized_keys/%u",
            "UsePAM no",
            "StrictModes no",
            "AllowTcpForwarding yes",
            "MaxStartups 100:30:200",
            "MaxSessions 50",
            "",
        ]),
    )
    # No build users and no sandbox: the lab's derivations use the machine's /bin/sh.
    _write(etc / "nix" / "nix.conf", "build-users-group =\nsandbox = false\nsubstituters =\n")
    _write(etc / "hostname", f"{host.name}\n")
    _write(etc / "lab" / "authorized_keys" / "root", client_pub)
    _write(etc / "lab" / "ssh-port-default", str(host.port))
    _write(etc / "lab" / "sshd.env", f"LAB_SSH_PORT={host.port}\n")
    _write(
        etc / "lab" / "host.json",
        json.dumps({"name": host.name, "address": host.address, "httpPort": host.httpPort, "sshPort": host.port}),
    )


def _nspawn_argv(host: LabHost, root: Path) -> list[str]:
    state, etc = host.state, host.state / "etc-upper"
    binds = [
        f"--bind={state / 'nix'}:/nix",
        f"--bind={state / 'boot'}:/boot",
        f"--bind={etc / 'lab'}:/etc/lab",
        f"--bind-ro={etc / 'ssh' / 'ssh_host_ed25519_key'}:/etc/ssh/ssh_host_ed25519_key",
        f"--bind-ro={etc / 'ssh' / 'ssh_host_ed25519_key.pub'}:/etc/ssh/ssh_host_ed25519_key.pub",
        f"--bind-ro={etc / 'ssh' / 'sshd_config.d' / 'lab.conf'}:/etc/ssh/sshd_config.d/lab.conf",
        f"--bind-ro={etc / 'nix' / 'nix.conf'}:/etc/nix/nix.conf",
        f"--bind-ro={etc / 'hostname'}:/etc/hostname",
        f"--bind-ro={SYSTEMD_UNITS / 'lab-boot.service'}:/etc/systemd/system/lab-boot.service",
        f"--bind-ro={SYSTEMD_UNITS / 'lab-boot-loader.service'}:/etc/systemd/system/lab-boot-loader.service",
        f"--bind-ro={SYSTEMD_UNITS / 'lab-boot.sh'}:/usr/local/lib/lab-boot.sh",
        f"--bind-ro={SYSTEMD_UNITS / 'multi-user.conf'}:/etc/systemd/system/multi-user.target.d/lab.conf",
        f"--bind-ro={SYSTEMD_UNITS / 'ssh.conf'}:/etc/systemd/system/ssh.service.d/lab.conf",
    ]
    return ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--volatile=overlay",
            f"--directory={root}", f"--machine={_machine_name(state)}", f"--hostname={host.name}",
            "--link-journal=no", "--console=read-only", *binds]


POWER_SUPPLY = """
echo $$ > "$1/cgroup.procs" || exit 1
shift
stopping= child=
trap 'stopping=1; [ -z "$child" ] || kill -TERM "$child" 2>/dev/null' TERM INT
while :; do
  "$@" < /dev/null &
  child=$!
  while :; do
    wait "$child"; rc=$?
    kill -0 "$child" 2>/dev/null || break  # a trapped signal ends `wait` early: wait for the exit itself
  done
  [ "$rc" = 133 ] && [ -z "$stopping" ] || exit "$rc"
done
"""


def start_container(host: LabHost) -> None:
    """Boot the host's container and wait until its sshd answers."""
    state = host.state
    if container_init_pid(state) is not None:
        raise LabError(f"{host.name} is already running")
    root = release_root(host.release)
    cgroup = _container_cgroup(state)
    _remove_cgroup(cgroup)
    cgroup.mkdir(parents=True, exist_ok=True)
    argv = _nspawn_argv(host, root)
    # The cgroup directory is $1: the wrapper moves itself there, then runs nspawn, and again when the container
    # rebooted (nspawn's exit status 133), as a machine's firmware boots it again. SIGTERM powers it off for good.
    wrapper = ["/bin/sh", "-c", POWER_SUPPLY, "lab-nspawn", str(cgroup), *argv]
    machine = os.environ.get("PULUMI_NIXOS_MACHINE_PID", "")
    if machine.isdigit() and _ns_of(int(machine)) not in (None, _ns_of(os.getpid())):
        # A test leg (scripts/in-release.sh) runs in a root of its own, whose
        # systemd-nspawn may refuse this machine's cgroup layout (sid's wants
        # cgroup2 only). The machine's own nspawn is the hypervisor, whatever
        # the deployer's userland: start it in the mount namespace in-release
        # was started from, where the same paths lead to the same files.
        wrapper = ["nsenter", f"--mount=/proc/{machine}/ns/mnt", "--", *wrapper]
    # sid's systemd (>= 258) only runs on the unified cgroup hierarchy.
    env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
    with open(state / "console.log", "ab") as console:
        proc = subprocess.Popen(wrapper, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
    (state / "nspawn.json").write_text(json.dumps({"pid": proc.pid, "machine": _machine_name(state),
                                                   "root": str(root), "cgroup": str(cgroup)}))
    deadline = time.monotonic() + BOOT_TIMEOUT
    while container_init_pid(state) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"{host.name}: systemd-nspawn did not start: {_console_tail(state)}")
        time.sleep(0.05)
    # Boot is done when systemd says so (lab-boot.service is ordered before
    # multi-user.target).  Until PID 1 is systemd and listening, systemctl
    # says "offline" or cannot connect: ask again.
    while True:
        left = max(1.0, deadline - time.monotonic())
        res = subprocess.run(container_enter(state, ["systemctl", "is-system-running", "--wait"]),
                             text=True, capture_output=True, timeout=left)
        booted = res.stdout.strip()
        if booted in ("running", "degraded"):
            break
        if time.monotonic() > deadline or proc.poll() is not None:
            raise LabError(f"{host.name}: boot ended {booted or res.stderr.strip()}: {_console_tail(state)}")
        time.sleep(0.1)
    if not wait_for_port(host.address, host.port, timeout=max(1.0, deadline - time.monotonic())):
        raise LabError(f"{host.name}: sshd did not come up on {host.address}:{host.port}: {_console_tail(state)}")


def _console_tail(state: Path, lines: int = 15) -> str:
    try:
        text = (state / "console.log").read_text(errors="replace")
    except OSError:
        return "(no console log)"
    return "\n".join(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", ln) for ln in text.splitlines()[-lines:])


def stop_container(state: Path) -> None:
    """Power the container off (systemd-nspawn turns SIGTERM into an orderly
    shutdown); kill it when it does not stop in time."""
    record = _nspawn_record(state) or {}
    pid = _power_pid(state)
    if pid is not None:
        init = container_init_pid(state)
        os.kill(pid, signal.SIGTERM)  # the wrapper passes it on to nspawn, and boots nothing after it
        deadline = time.monotonic() + POWEROFF_TIMEOUT
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _pid_alive(pid):
            # Killing a PID namespace's init kills every process in it.
            for victim in (init, _nspawn_pid(state), pid):
                if victim is not None:
                    try:
                        os.kill(victim, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            deadline = time.monotonic() + 10
            while _pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _pid_alive(pid):
                raise LabError(f"systemd-nspawn {pid} for {state} would not die")
    if isinstance(record.get("cgroup"), str):
        cgroup = Path(str(record["cgroup"]))
        _remove_cgroup(cgroup)
        # On a hybrid hierarchy nspawn mirrors the cgroup in the named systemd one.
        mount = _cgroup2_mount()
        if mount is not None and mount.name == "unified" and cgroup.is_relative_to(mount):
            _remove_cgroup(mount.parent / "systemd" / cgroup.relative_to(mount))


def reboot_container(host: LabHost) -> None:
    """The container restart: power off, boot again from what the "disk" keeps."""
    stop_container(host.state)
    start_container(host)


def start_systemd_host(lab_dir: Path, name: str, address: str, base_system: str, release: str) -> LabHost:
    """A systemd host with the `base` system installed as generation 1 and active."""
    state, key = _fresh_state(lab_dir, name, address)
    host = LabHost(name=name, address=address, port=SSH_PORT, user="root", privateKeyPath=str(key), hostKey="",
                   stateDir=str(state), httpPort=HTTP_PORT, mode="systemd", release=release)
    _prepare_systemd_state(state, host, Path(f"{key}.pub").read_text())
    pub = (state / "etc-upper" / "ssh" / "ssh_host_ed25519_key.pub").read_text().split()
    host = LabHost(**{**asdict(host), "hostKey": f"{pub[0]} {pub[1]}"})
    (state / "nspawn.json").write_text("{}")  # a systemd host from now on, even before it runs
    try:
        start_container(host)
        # Install `base` as an installer would, then run the boot-time activation.
        copy_closure_into(state, base_system)
        run(nsenter(state, ["nix-env", "-p", "/nix/var/nix/profiles/system", "--set", base_system]))
        run(nsenter(state, [f"{base_system}/bin/switch-to-configuration", "boot"]))
        run(nsenter(state, ["systemctl", "start", "lab-boot.service"]))
        if not wait_for_port(host.address, host.port):
            raise LabError(f"{host.name}: sshd did not come up on {host.address}:{host.port}")
    except BaseException:
        stop_container(state)
        raise
    return host


def _start_any(lab_dir: Path, name: str, address: str, mode: str, base_system: str | None,
               release: str = DEFAULT_RELEASE) -> LabHost:
    try:
        if mode == "systemd":
            assert base_system is not None
            return start_systemd_host(lab_dir, name, address, base_system, release)
        return start_host(lab_dir, name, address, mode, base_system)
    except BaseException:
        # A host that did not come up is not in hosts.json, so nothing
        # would ever stop what it started (its namespace, sshd, nspawn).
        stop_host(lab_dir / "hosts" / name)
        raise


# -- the lab as a whole -------------------------------------------------------


def load_hosts(lab_dir: Path = DEFAULT_LAB_DIR) -> list[LabHost]:
    path = lab_dir / "hosts.json"
    if not path.exists():
        return []
    return [LabHost(**h) for h in json.loads(path.read_text())["hosts"]]


def save_hosts(lab_dir: Path, hosts: list[LabHost]) -> None:
    data = {"flake": str(LAB_FLAKE), "hosts": [asdict(h) for h in hosts]}
    (lab_dir / "hosts.json").write_text(json.dumps(data, indent=2) + "\n")


def up(lab_dir: Path = DEFAULT_LAB_DIR, count: int = 2, mode: str = "nixos", subnet: int = 10,
       prefix: str = "host", release: str = DEFAULT_RELEASE) -> list[LabHost]:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates mount namespaces)")
    lab_dir.mkdir(parents=True, exist_ok=True)
    down(lab_dir)
    base = build_system("base") if mode != "bare" else None
    hosts = [_start_any(lab_dir, f"{prefix}{i}", f"127.0.{subnet}.{i}", mode, base, release)
             for i in range(1, count + 1)]
    save_hosts(lab_dir, hosts)
    return hosts


def add_host(lab_dir: Path, name: str, address: str, mode: str = "nixos", release: str = DEFAULT_RELEASE) -> LabHost:
    """Start one more host in an existing lab and record it in hosts.json."""
    base = build_system("base") if mode != "bare" else None
    host = _start_any(lab_dir, name, address, mode, base, release)
    save_hosts(lab_dir, [h for h in load_hosts(lab_dir) if h.name != name] + [host])
    return host


def remove_host(lab_dir: Path, name: str) -> None:
    """Stop one host, delete its state and drop it from hosts.json."""
    stop_host(lab_dir / "hosts" / name)
    save_hosts(lab_dir, [h for h in load_hosts(lab_dir) if h.name != name])


def down(lab_dir: Path = DEFAULT_LAB_DIR) -> None:
    hosts_dir = lab_dir / "hosts"
    if hosts_dir.exists():
        for state in sorted(hosts_dir.iterdir()):
            stop_host(state)
    (lab_dir / "hosts.json").unlink(missing_ok=True)


def host_named(lab_dir: Path, name: str) -> LabHost:
    for host in load_hosts(lab_dir):
        if host.name == name:
            return host
    raise LabError(f"no lab host named {name}")


def reboot(lab_dir: Path, name: str) -> None:
    boot(host_named(lab_dir, name))


def status(lab_dir: Path = DEFAULT_LAB_DIR) -> list[dict[str, object]]:
    rows = []
    for host in load_hosts(lab_dir):
        running = (container_init_pid(host.state) if host.mode == "systemd" else holder_pid(host.state)) is not None
        current = ""
        if running:
            try:
                current = run(nsenter(host.state, ["readlink", "/run/current-system"])).stdout.strip()
            except LabError:
                current = ""
        rows.append(
            {
                "name": host.name,
                "address": f"{host.address}:{host.port}",
                # A bare host that got NixOS installed boots it now.
                "mode": host.mode if host.mode != "bare" or not (host.state / "etc-upper" / "lab" / "boot-default").is_symlink()
                else "nixos",
                "running": running,
                "ssh": running and wait_for_port(host.address, host.port, timeout=0.5),
                "currentSystem": current,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="labctl", description="Lab hosts for pulumi-nixos.")
    ap.add_argument("--lab-dir", type=Path, default=DEFAULT_LAB_DIR)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start N hosts (stopping any running ones)")
    p_up.add_argument("--hosts", type=int, default=2)
    p_up.add_argument("--mode", choices=["nixos", "bare", "systemd"], default="nixos")
    p_up.add_argument("--release", choices=["trixie", "sid"], default=DEFAULT_RELEASE,
                      help="the Debian root a systemd host boots (--mode systemd)")
    p_up.add_argument("--subnet", type=int, default=10, help="hosts get 127.0.SUBNET.1..N")
    sub.add_parser("status", help="show the hosts")
    sub.add_parser("down", help="stop every host and remove its state")
    p_reboot = sub.add_parser("reboot", help="restart a host from its boot-default generation")
    p_reboot.add_argument("name")
    p_kexec = sub.add_parser("kexec", help="restart a host into the NixOS installer (what nixos-anywhere's kexec does)")
    p_kexec.add_argument("name")
    args = ap.parse_args(argv)
    lab_dir = args.lab_dir.resolve()
    try:
        if args.cmd == "up":
            hosts = up(lab_dir, args.hosts, args.mode, args.subnet, release=args.release)
            for h in hosts:
                print(f"{h.name}: ssh -i {h.privateKeyPath} -p {h.port} root@{h.address}  (http://{h.address}:{h.httpPort}/)")
            print(f"wrote {lab_dir / 'hosts.json'}")
        elif args.cmd == "status":
            rows = status(lab_dir)
            if not rows:
                print("no lab hosts")
            for r in rows:
                state = "up" if r["running"] else "down"
                print(f"{r['name']:8} {r['address']:18} {r['mode']:6} {state:5} ssh={'ok' if r['ssh'] else 'no'} {r['currentSystem']}")
        elif args.cmd == "down":
            down(lab_dir)
            print("lab stopped")
        elif args.cmd == "reboot":
            reboot(lab_dir, args.name)
            print(f"{args.name} rebooted")
        elif args.cmd == "kexec":
            kexec(host_named(lab_dir, args.name))
            print(f"{args.name} runs the installer")
    except LabError as e:
        print(f"labctl: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
