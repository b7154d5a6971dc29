"""Fixtures: lab hosts (real sshd in private mount namespaces), built lab systems, pulumi projects."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "lab"))

import labctl  # noqa: E402
from nixos_provider.engine.models import Credentials, Remote  # noqa: E402

LAB_FLAKE = REPO / "tests" / "lab"
# Test hosts live on 127.0.NET.x and 127.0.NET+1.x; NET+9 is for hosts a
# program makes itself, NET-1 and NET+8 for the labctl command-line tests
# (namespace and systemd hosts). A second checkout testing at the same time
# sets its own.
LAB_NET = int(os.environ.get("LAB_TEST_NET", "20"))
_addresses = itertools.count(1)


def pytest_report_header() -> str:
    """Which Nix this run tests (the matrix leg), at the top of the log."""
    try:
        version = subprocess.run(["nix", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    except FileNotFoundError:
        version = "no nix on PATH"
    return f"nix: {version} (leg: {os.environ.get('PULUMI_NIXOS_LEG', 'this machine')})"


# Fixtures that need the lab (root, Nix builds, lab hosts) or the pulumi CLI:
# a test using any of them is marked `lab`, so `pytest -m "not lab"` is the
# fast tier, which needs neither root nor Nix.
LAB_FIXTURES = {"lab_dir", "systems", "pulumi_available", "local_nix"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if LAB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)


@pytest.fixture(scope="session")
def lab_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("lab hosts need root (mount namespaces)")
    # A fixed place, so a run that crashed leaves hosts this run can stop; a
    # lock, so two test sessions never stop each other's hosts.
    # One lab directory per matrix leg: the legs run side by side.
    leg = os.environ.get("PULUMI_NIXOS_LEG")
    d = REPO / ".lab" / (f"test-{leg}" if leg else "test")
    d.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f"{d.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        labctl.down(d)
        d.mkdir(parents=True, exist_ok=True)
        yield d
        labctl.down(d)


class Systems:
    """Lab configurations, built once per session on first use."""

    def __init__(self) -> None:
        self._built: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        if name not in self._built:
            self._built[name] = labctl.build_system(name)
        return self._built[name]


@pytest.fixture(scope="session")
def systems() -> Systems:
    return Systems()


class HostFactory:
    def __init__(self, lab_dir: Path) -> None:
        self.lab_dir = lab_dir
        self.started: list[labctl.LabHost] = []

    def __call__(self, mode: str = "nixos", release: str = labctl.DEFAULT_RELEASE) -> labctl.LabHost:
        """A lab host: "nixos" or "bare" (a mount namespace), or "systemd"
        (systemd-nspawn of the Debian `release` root, systemd as PID 1)."""
        if mode == "systemd" and (why := labctl.systemd_unavailable()) is not None:
            pytest.skip(why)
        n = next(_addresses)
        name = f"t{n}"
        host = labctl.add_host(self.lab_dir, name, f"127.0.{LAB_NET + n // 250}.{n % 250 + 1}", mode, release)
        self.started.append(host)
        return host

    def stop_all(self) -> None:
        for host in self.started:
            labctl.stop_host(host.state)


@pytest.fixture
def new_host(lab_dir: Path) -> Iterator[HostFactory]:
    factory = HostFactory(lab_dir)
    yield factory
    factory.stop_all()


@pytest.fixture
def lab_host(new_host: HostFactory) -> labctl.LabHost:
    return new_host()


def remote_for(host: labctl.LabHost, **kw: object) -> Remote:
    key = Path(host.privateKeyPath).read_text()
    return Remote(host.address, host.port, kw.pop("user", "root"),  # type: ignore[arg-type]
                  Credentials(private_key=key), **kw)  # type: ignore[arg-type]


# Where the frames of upstream's tracebacks are: the Python SDK and its gRPC, the Python language host's runner,
# the standard library.
UPSTREAM_FRAMES = re.compile(r'/site-packages/(pulumi|grpc|google)/|/pulumi-language-python-exec"|/lib/python3\.\d+/'
                             r'|"<frozen |"src/python/grpcio/')


def has_provider_traceback(out: str) -> bool:
    """A traceback of ours in the CLI's output (the plugin's frames name nixos_provider), or one of unknown origin.

    The one traceback allowed is upstream's: a Python program's pending registrations, which Pulumi's Python SDK
    (3.259 and later, on the current language host) fails to log to an engine that a failed resource stopped
    ("Resource monitor has terminated"); how much of it is printed, and where it is interrupted
    (KeyboardInterrupt, "no running event loop"), depends on timing. Its frames are all the SDK's, gRPC's, the
    language host's or the standard library's, never the provider's.
    """
    if "nixos_provider" in out:
        return True
    if "Traceback" not in out:
        return False
    frames = re.findall(r'^\s*File "[^"\n]*"?[^\n]*$', out, re.M)
    return not frames or any(not UPSTREAM_FRAMES.search(frame) for frame in frames)


def in_host(host: labctl.LabHost, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command inside the lab host's namespace (the test's view of the target, not the deployer's)."""
    return subprocess.run(labctl.nsenter(host.state, list(argv)), text=True, capture_output=True, check=check)


def current_system(host: labctl.LabHost) -> str:
    return in_host(host, "readlink", "/run/current-system").stdout.strip()


def http_version(host: labctl.LabHost) -> str | None:
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://{host.address}:{host.httpPort}/", timeout=3) as r:
            return str(json.loads(r.read())["version"])
    except Exception:
        return None


# -- the real pulumi CLI --------------------------------------------------------


class PulumiProject:
    """A project directory plus a file:// backend, driven through the real `pulumi` CLI."""

    def __init__(self, workdir: Path, backend: Path) -> None:
        self.dir = workdir
        # Programs name this folder as the plugin's path: its launcher runs the provider and keeps a copy of what it
        # writes to stderr, where a traceback would reach users (the CLI prints it when the plugin dies).
        self.plugin_dir = backend / "plugin"
        self.plugin_stderr = backend / "plugin-stderr.log"
        self.plugin_dir.mkdir(exist_ok=True)
        launcher = self.plugin_dir / "pulumi-resource-nixos"
        launcher.write_text(f"#!/bin/bash\nexec {REPO / 'provider' / 'pulumi-resource-nixos'} \"$@\" "
                            f"2> >(exec tee -a {self.plugin_stderr} >&2)\n")
        launcher.chmod(0o755)
        self.env = {
            **os.environ,
            "PULUMI_BACKEND_URL": f"file://{backend}",
            "PULUMI_CONFIG_PASSPHRASE": "test-passphrase",
            "PULUMI_SKIP_UPDATE_CHECK": "1",
            "PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION": "1",
            "PULUMI_HOME": str(backend / ".pulumi-home"),
            # The provider's evaluation results and stack plans: each test starts with none.
            "PULUMI_NIXOS_EVALUATION_STORE": str(backend / ".evaluations"),
        }

    def run(self, *args: str, check: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["pulumi", "--non-interactive", *args], cwd=self.dir, env={**self.env, **(env or {})},
                              text=True, capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"pulumi {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def up(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("up", "--yes", "--skip-preview", *extra, check=check)

    def outputs(self) -> dict[str, object]:
        return json.loads(self.run("stack", "output", "--json", "--show-secrets").stdout)  # type: ignore[no-any-return]

    def state(self) -> dict[str, object]:
        return json.loads(self.run("stack", "export").stdout)  # type: ignore[no-any-return]

    def resource(self, type_suffix: str) -> dict[str, object]:
        for r in self.state()["deployment"]["resources"]:  # type: ignore[index]
            if r["type"].endswith(type_suffix):
                return r  # type: ignore[no-any-return]
        raise AssertionError(f"no {type_suffix} in state")


def _on_path(program: str, what: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{what} is not on PATH; run the tests through `make test`")
    return path


@pytest.fixture(scope="session")
def local_nix() -> str:
    """This machine's Nix, for tests that evaluate."""
    return _on_path("nix", "nix")


@pytest.fixture(scope="session")
def pulumi_available() -> str:
    return _on_path("pulumi", "the pulumi CLI")


@pytest.fixture
def project(tmp_path: Path, pulumi_available: str) -> Iterator[PulumiProject]:
    (tmp_path / "state").mkdir()
    (tmp_path / "prog").mkdir()
    made = PulumiProject(tmp_path / "prog", tmp_path / "state")
    yield made
    written = made.plugin_stderr.read_text() if made.plugin_stderr.exists() else ""
    assert "Traceback" not in written, f"the plugin wrote a traceback to its stderr:\n{written}"


def git_commit(repo: Path, *paths: str) -> None:
    """Makes `repo` a Git repository with `paths` committed, the rest left untracked: a user's checkout."""
    git = ["git", "-C", str(repo), "-c", "user.name=lab", "-c", "user.email=lab@example.org"]
    for args in (["init", "-q"], ["add", *paths], ["commit", "-qm", "lab"]):
        subprocess.run(git + args, check=True, capture_output=True)


def write_flake(dest: Path, body: str) -> str:
    """A test flake beside a copy of the lab library; returns its path: reference."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in ("lib.nix", "switch-to-configuration.sh", "lab-service.py"):
        shutil.copy(LAB_FLAKE / f, dest / f)
    (dest / "flake.nix").write_text(body)
    return f"path:{dest}"
