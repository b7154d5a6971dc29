#!/usr/bin/env python3
"""labctl: start, stop, reboot and inspect lab hosts.

A lab host is an OpenSSH server on its own loopback address, running inside
its own mount namespace with a private /nix, /run and (overlaid) /etc.  A
deployer that pushes a closure to it really crosses stores, and activation
really changes what runs there.  See docs/lab.md.

Usage:
    labctl.py up [--hosts N] [--mode nixos|bare] [--lab-dir DIR] [--subnet K]
    labctl.py status [--lab-dir DIR]
    labctl.py down [--lab-dir DIR]
    labctl.py reboot NAME [--lab-dir DIR]
    labctl.py kexec NAME [--lab-dir DIR]

`up` writes DIR/hosts.json describing each host (name, address, port, user,
privateKeyPath, hostKey, stateDir, httpPort, mode) for tests, examples and the
demo.  Needs root: it creates mount namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
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
NIX = ["nix", "--extra-experimental-features", "nix-command flakes", "--option", "substituters", ""]
# A lab host's own Nix settings (its /etc/nix/nix.conf), the same ones
# scripts/env.sh gives the deployer: the host has no nixbld group, and the
# lab's derivations run the machine's /bin/sh, which a sandbox would hide.
NIX_CONF = "build-users-group =\nsandbox = false\nsubstituters =\nexperimental-features = nix-command flakes\n"


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
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return str(state.resolve() / "nix") in f.read()
    except OSError:
        return False


def kill_namespace(state: Path, keep_holder: bool) -> None:
    ns_file = state / "ns"
    if not ns_file.exists():
        return
    ns = ns_file.read_text().strip()
    holder = holder_pid(state)
    members = processes_in_namespace(ns)
    if members and not any(_sees_host_store(p, state) for p in members[:5]):
        return  # the namespace this host had is gone; its id now belongs to another
    for _ in range(50):
        victims = [p for p in processes_in_namespace(ns) if not (keep_holder and p == holder)]
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
        raise LabError(f"copying {store_path} into lab host failed: {imp.stderr.strip()}")


def _prepare_etc(state: Path, host: LabHost, client_pub: str, mode: str) -> None:
    etc = state / "etc-upper"
    for sub in ("etc-upper", "etc-work", "nix", "run"):
        (state / sub).mkdir(parents=True, exist_ok=True)
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
    _write(etc / "lab" / "ssh-port-default", str(host.port))
    _write(
        etc / "lab" / "host.json",
        json.dumps({"name": host.name, "address": host.address, "httpPort": host.httpPort, "sshPort": host.port}),
    )
    _write(etc / "sudoers.d" / "lab-alice", f"{USER_NAME} ALL=(ALL) NOPASSWD: ALL\n", 0o440)
    _write(etc / "nix" / "nix.conf", NIX_CONF)
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
        'mount --bind "$s/run" /run; '
        'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$s/etc-upper,workdir=$s/etc-work" /etc; '
        # Disk encryption keys land in /tmp: it must be the host's own.
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
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
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
    state = host.state
    _power_cycle(state)
    in_ns = lambda cmd: run(nsenter(state, cmd))  # noqa: E731
    _start_nix_daemon(state)
    default = state / "etc-upper" / "lab" / "boot-default"
    if default.is_symlink():
        system = os.readlink(default)
        in_ns(["ln", "-sfn", system, "/run/booted-system"])
        # Boot-time activation: the same script NixOS's stage 2 runs.
        in_ns([f"{system}/bin/switch-to-configuration", "test"])
    else:
        in_ns(["/usr/sbin/sshd", "-f", "/etc/ssh/sshd_config", "-o", f"Port={host.port}"])
    if not wait_for_port(host.address, host.port):
        raise LabError(f"{host.name}: sshd did not come up on {host.address}:{host.port}")


def kexec(host: LabHost) -> None:
    """Restart the host into a NixOS installer running from memory, as
    nixos-anywhere's kexec phase does: /etc/os-release says VARIANT_ID=installer,
    the installer keeps the machine's SSH host key (the kexec image carries
    it over) and root's authorized keys, and the disk is left alone."""
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


def start_host(lab_dir: Path, name: str, address: str, mode: str, base_system: str | None) -> LabHost:
    state = lab_dir / "hosts" / name
    if state.exists():
        stop_host(state)
    if wait_for_port(address, SSH_PORT, timeout=0.2):
        raise LabError(f"{address}:{SSH_PORT} is already in use (a lab from another directory still running?)")
    state.mkdir(parents=True)
    key = _client_key(lab_dir)
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
    run(nsenter(state, ["chpasswd"]), input=f"{USER_NAME}:{USER_PASSWORD}\n")
    if mode == "nixos":
        assert base_system is not None
        copy_closure_into(state, base_system)
        run(nsenter(state, ["nix-env", "-p", "/nix/var/nix/profiles/system", "--set", base_system]))
        run(nsenter(state, [f"{base_system}/bin/switch-to-configuration", "boot"]))
    boot(host)
    return host


def stop_host(state: Path) -> None:
    stop_nix_daemon(state)
    kill_namespace(state, keep_holder=False)
    pid = holder_pid(state)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(state, ignore_errors=True)


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
       prefix: str = "host") -> list[LabHost]:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (it creates mount namespaces)")
    lab_dir.mkdir(parents=True, exist_ok=True)
    down(lab_dir)
    base = build_system("base") if mode == "nixos" else None
    hosts = [start_host(lab_dir, f"{prefix}{i}", f"127.0.{subnet}.{i}", mode, base) for i in range(1, count + 1)]
    save_hosts(lab_dir, hosts)
    return hosts


def add_host(lab_dir: Path, name: str, address: str, mode: str = "nixos") -> LabHost:
    """Start one more host in an existing lab and record it in hosts.json."""
    base = build_system("base") if mode == "nixos" else None
    host = start_host(lab_dir, name, address, mode, base)
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
        running = holder_pid(host.state) is not None
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
                "mode": "nixos" if (host.state / "etc-upper" / "lab" / "boot-default").is_symlink() else host.mode,
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
    p_up.add_argument("--mode", choices=["nixos", "bare"], default="nixos")
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
            hosts = up(lab_dir, args.hosts, args.mode, args.subnet)
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
