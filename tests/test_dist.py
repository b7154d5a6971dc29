"""`make dist`'s artifacts used the way a user outside this repository uses them.

Each test runs in a fresh PULUMI_HOME and a project directory outside the checkout, with a
Python that has no packages of its own (so the plugin runs on what its archive carries), and
names no plugin path: the engine finds the plugin from the archive, downloaded by itself
from a local HTTP server or installed with `pulumi plugin install --file`.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import labctl
import pytest
from conftest import REPO, HostFactory, Systems, current_system, http_version
from google.protobuf import empty_pb2
from pulumi.runtime.proto import provider_pb2_grpc

# The archive and the SDK packages need the toolchains `make setup` builds: not the fast tier.
pytestmark = [pytest.mark.e2e, pytest.mark.lab, pytest.mark.timeout(900)]
VERSION = subprocess.run(["bash", str(REPO / "scripts" / "version.sh")], check=True, capture_output=True,
                         text=True).stdout.strip()
ARCHIVE = f"pulumi-resource-nixos-v{VERSION}-linux-amd64.tar.gz"
DOWNLOAD_URL = "github://api.github.com/pulumi-nixos/pulumi-nixos"
GO_MODULE = "github.com/pulumi-nixos/pulumi-nixos/sdk/go"


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make dist`'s output, built once per session (scripts/dist.sh into a scratch directory)."""
    out = tmp_path_factory.mktemp("dist")
    run(["bash", str(REPO / "scripts" / "dist.sh"), str(out)], REPO, dict(os.environ), timeout=900)
    return out


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a Python with nothing installed: no pulumi, no grpcio, no pip."""
    venv = tmp_path_factory.mktemp("bare-python")
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], REPO, dict(os.environ))
    probe = subprocess.run([str(venv / "bin" / "python3"), "-c", "import grpc"], capture_output=True, text=True)
    assert probe.returncode != 0, "the bare Python can import grpc; it would hide what the archive lacks"
    return venv / "bin"


class PluginServer:
    """The archive over HTTP on 127.0.0.1 (a free port the OS picks), logging what is fetched."""

    def __init__(self, root: Path) -> None:
        self.fetched: list[str] = []
        fetched = self.fetched

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: object, **kw: object) -> None:
                super().__init__(*args, directory=str(root), **kw)  # type: ignore[arg-type]

            def log_message(self, format: str, *args: object) -> None:
                fetched.append(self.path)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def plugin_server(dist: Path) -> Iterator[PluginServer]:
    server = PluginServer(dist)
    yield server
    server.close()


class UserProject:
    """A project directory outside the checkout and a user's Pulumi: fresh PULUMI_HOME, file:// backend,
    automatic plugin acquisition on, PATH without this checkout's virtualenv."""

    def __init__(self, tmp: Path, bare_python: Path) -> None:
        assert not tmp.is_relative_to(REPO)
        self.dir = tmp / "project"
        self.home = tmp / "pulumi-home"
        for d in (self.dir, self.home, tmp / "state"):
            d.mkdir()
        path = [p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != REPO / ".venv" / "bin"]
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION", "VIRTUAL_ENV", "PYTHONPATH",
                                 "PULUMI_NIXOS_SCHEMA", "PULUMI_NIXOS_PYTHON")}
        self.env.update(PULUMI_HOME=str(self.home), PULUMI_BACKEND_URL=f"file://{tmp / 'state'}",
                        PULUMI_CONFIG_PASSPHRASE="test-passphrase", PULUMI_SKIP_UPDATE_CHECK="1",
                        PATH=os.pathsep.join([str(bare_python), *path]))

    def pulumi(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run(["pulumi", "--non-interactive", *args], self.dir, self.env, timeout)

    def install_plugin(self, dist: Path) -> None:
        self.pulumi("plugin", "install", "resource", "nixos", VERSION, "--file", str(dist / ARCHIVE))
        # From here on the engine must find the installed plugin; it may not fetch one.
        self.env["PULUMI_DISABLE_AUTOMATIC_PLUGIN_ACQUISITION"] = "true"

    def installed_plugins(self) -> list[tuple[str, str]]:
        listed = json.loads(self.pulumi("plugin", "ls", "--json").stdout) or []
        return [(p["name"], p["version"]) for p in listed if p["kind"] == "resource"]

    def deploy_web(self, host: labctl.LabHost) -> dict[str, object]:
        """`pulumi up` of a program taking host, port, privateKey, flake and healthUrl from config: the lab's `web`."""
        self.pulumi("stack", "init", "dev")
        for key, value in {"host": host.address, "port": str(host.port), "flake": f"path:{labctl.LAB_FLAKE}#web",
                           "healthUrl": f"http://{host.address}:{host.httpPort}/"}.items():
            self.pulumi("config", "set", key, value)
        self.pulumi("config", "set", "--secret", "privateKey", "--", Path(host.privateKeyPath).read_text())
        self.pulumi("up", "--yes", "--skip-preview", timeout=900)
        return json.loads(self.pulumi("stack", "output", "--json").stdout)  # type: ignore[no-any-return]


@pytest.fixture
def user(tmp_path: Path, bare_python: Path) -> UserProject:
    return UserProject(tmp_path, bare_python)


def test_archive_layout_and_plugin_install_from_file(dist: Path, user: UserProject) -> None:
    with tarfile.open(dist / ARCHIVE) as archive:
        names = archive.getnames()
        launcher = archive.getmember("pulumi-resource-nixos")
    assert launcher.mode & 0o111, "the launcher is not executable"
    assert "schema.json" in names
    trees = sorted({n.split("/")[1] for n in names if n.startswith("lib/") and n.count("/") >= 2})
    assert trees == ["cp311", "cp312", "cp313", "cp314"]
    for tree in trees:
        for package in ("nixos_provider/__main__.py", "nixos_provider/engine/target/supervisor.sh", "grpc/__init__.py",
                        "asyncssh/__init__.py", "pulumi/__init__.py", "cryptography/__init__.py"):
            assert f"lib/{tree}/{package}" in names, f"{package} missing from lib/{tree}"
        assert any(n.startswith(f"lib/{tree}/grpc/_cython/cygrpc.cpython-{tree[2:]}-x86_64-linux-gnu")
                   for n in names), f"no compiled grpc for {tree}"
    # The Python that builds the archive compiles its tree, so a read-only install starts without compiling.
    tag = f"{sys.version_info.major}{sys.version_info.minor}"
    assert f"lib/cp{tag}/nixos_provider/engine/__pycache__/deploy.cpython-{tag}.pyc" in names

    user.install_plugin(dist)
    assert user.installed_plugins() == [("nixos", VERSION)]
    schema = json.loads(user.pulumi("package", "get-schema", f"nixos@{VERSION}").stdout)
    assert schema["version"] == VERSION and schema["pluginDownloadURL"] == DOWNLOAD_URL


def test_launcher_names_the_pythons_it_carries_when_none_is_found(dist: Path, tmp_path: Path,
                                                                  bare_python: Path) -> None:
    with tarfile.open(dist / ARCHIVE) as archive:
        archive.extractall(tmp_path / "plugin", filter="data")
    # What GetPluginInfo reports, from the metadata the archive's tree carries.
    reported = subprocess.run([str(bare_python / "python3"), "-s", "-c",
                               "import nixos_provider; print(nixos_provider.provider_version())"],
                              env={**os.environ, "PYTHONPATH": str(tmp_path / "plugin" / "lib" / "cp311")},
                              capture_output=True, text=True, timeout=30)
    assert reported.stdout.strip() == VERSION, reported.stderr
    proc = subprocess.run([str(tmp_path / "plugin" / "pulumi-resource-nixos")], capture_output=True, text=True,
                          env={**os.environ, "PULUMI_NIXOS_PYTHON": "/bin/false"}, timeout=30)
    assert proc.returncode == 1
    assert "no CPython this plugin carries libraries for (3.11 3.12 3.13 3.14)" in proc.stderr
    assert "PULUMI_NIXOS_PYTHON" in proc.stderr and "Traceback" not in proc.stderr


def test_the_archive_runs_on_cpython_3_14(dist: Path, tmp_path: Path) -> None:
    """Debian sid's python3 is CPython 3.14: there the launcher picks lib/cp314, and the plugin serves."""
    root = Path((REPO / ".tools" / "root-sid").read_text().strip())
    assert (root / "usr" / "bin" / "python3.14").exists(), "the sid root has no python3.14 (scripts/release-root.sh)"
    with tarfile.open(dist / ARCHIVE) as archive:
        archive.extractall(tmp_path / "plugin", filter="data")
    # The archive bound into the root in a mount namespace of its own: the cached root itself is not changed.
    inside = "mount --bind \"$1\" \"$2/mnt\" && mount -t proc proc \"$2/proc\" && exec chroot \"$2\" /mnt/pulumi-resource-nixos"
    plugin = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", inside, "sh",
                               str(tmp_path / "plugin"), str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"})
    try:
        port = plugin.stdout.readline().strip() if plugin.stdout else ""
        assert port.isdigit(), plugin.communicate(timeout=10)[1] if plugin.poll() is not None else port
        assert os.readlink(f"/proc/{plugin.pid}/exe").endswith("/usr/bin/python3.14")
        environ = Path(f"/proc/{plugin.pid}/environ").read_bytes().split(b"\0")
        assert b"PYTHONPATH=/mnt/lib/cp314" in environ
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            info = provider_pb2_grpc.ResourceProviderStub(channel).GetPluginInfo(empty_pb2.Empty(), timeout=30)
        assert info.version == VERSION
    finally:
        plugin.kill()
        plugin.wait()


def test_yaml_example_downloads_the_plugin_and_deploys(dist: Path, user: UserProject, plugin_server: PluginServer,
                                                        new_host: HostFactory, systems: Systems) -> None:
    example = REPO / "examples" / "yaml-single-host"
    shutil.copytree(example, user.dir, dirs_exist_ok=True)
    assert "path:" not in (user.dir / "Pulumi.yaml").read_text()
    declared = (user.dir / "sdks" / "nixos.yaml").read_text()
    assert f"version: {VERSION}\n" in declared and f"downloadUrl: {DOWNLOAD_URL}\n" in declared
    # The published URL, sent to the local server instead (the engine's own override setting).
    user.env["PULUMI_PLUGIN_DOWNLOAD_URL_OVERRIDES"] = f"^{DOWNLOAD_URL}$={plugin_server.url}"
    host = new_host()
    user.pulumi("stack", "init", "dev")
    for key, value in {"host": host.address, "port": str(host.port), "keyPath": host.privateKeyPath,
                       "flake": f"path:{labctl.LAB_FLAKE}#web",
                       "healthUrl": f"http://{host.address}:{host.httpPort}/"}.items():
        user.pulumi("config", "set", key, value)
    assert user.installed_plugins() == []
    up = user.pulumi("up", "--yes", "--skip-preview", timeout=900)
    assert f"/{ARCHIVE}" in plugin_server.fetched, f"the engine fetched {plugin_server.fetched}"
    assert f"nixos-{VERSION}" in up.stdout + up.stderr  # the engine's "[resource plugin nixos-X] installing"
    assert user.installed_plugins() == [("nixos", VERSION)]
    outputs = json.loads(user.pulumi("stack", "output", "--json").stdout)
    assert outputs["systemPath"] == systems["web"] == current_system(host)
    assert http_version(host) == "1"
    user.pulumi("destroy", "--yes", "--skip-preview")
    assert current_system(host) == systems["base"]


PYTHON_PROGRAM = '''\
import pulumi
import pulumi_nixos as nixos

config = pulumi.Config()
host = config.require("host")
machine = nixos.NixosMachine(
    "web",
    connection=nixos.ConnectionArgs(host=host, port=config.require_int("port"),
                                    private_key=config.require_secret("privateKey")),
    flake=config.require("flake"),
    health_checks=[nixos.HealthCheckArgs(http=config.require("healthUrl"), retries=5)],
)
pulumi.export("systemPath", machine.system_path)
pulumi.export("sdkVersion", nixos._utilities.get_version())
'''


def test_python_program_with_the_wheel(dist: Path, user: UserProject, new_host: HostFactory,
                                       systems: Systems, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path, user.env)
    wheel = dist / f"pulumi_nixos-{VERSION}-py3-none-any.whl"
    with tarfile.open(dist / f"pulumi_nixos-{VERSION}.tar.gz") as sdist:
        member = sdist.extractfile(f"pulumi_nixos-{VERSION}/pulumi_nixos/pulumi-plugin.json")
        assert member is not None
        assert json.loads(member.read()) == {"resource": True, "name": "nixos", "version": VERSION,
                                             "server": DOWNLOAD_URL}
    # pulumi at the version this checkout tests with, so pip takes it from its cache.
    run([str(venv / "bin" / "pip"), "install", "-q", str(wheel), "pulumi==3.259.0"], tmp_path, user.env)
    shown = run([str(venv / "bin" / "pip"), "show", "pulumi_nixos"], tmp_path, user.env).stdout
    assert f"Version: {VERSION}\n" in shown
    (user.dir / "Pulumi.yaml").write_text(
        f"name: wheel-user\nruntime:\n  name: python\n  options:\n    virtualenv: {venv}\n")
    # Activated too (`source venv/bin/activate`): the Python language host this checkout builds
    # (v3.79.0) reads no runtime options from the engine, so it runs the `python` on PATH.
    user.env["PATH"] = f"{venv / 'bin'}{os.pathsep}{user.env['PATH']}"
    (user.dir / "__main__.py").write_text(PYTHON_PROGRAM)
    user.install_plugin(dist)
    host = new_host()
    outputs = user.deploy_web(host)
    assert outputs["systemPath"] == systems["web"] == current_system(host)
    assert outputs["sdkVersion"] == VERSION
    # A typo in a plain dict given for a typed input reaches the provider as written: Check names it.
    (user.dir / "__main__.py").write_text(PYTHON_PROGRAM.replace(
        "nixos.HealthCheckArgs(http=config.require(\"healthUrl\"), retries=5)",
        "{\"http\": config.require(\"healthUrl\"), \"retries\": 5, \"timout\": 3}"))
    typo = subprocess.run(["pulumi", "--non-interactive", "--color=never", "preview"], cwd=user.dir, env=user.env,
                          text=True, capture_output=True, timeout=600)
    out = typo.stdout + typo.stderr
    assert typo.returncode != 0
    assert "healthChecks[0].timout" in out and "is not a property of HealthCheck (did you mean `timeout`?)" in out
    # The Python SDK prints its own traceback of the refused registration; none comes from the provider.
    assert "nixos_provider" not in out, out


TYPESCRIPT_PROGRAM = '''\
import * as pulumi from "@pulumi/pulumi";
import * as nixos from "@pulumi-nixos/nixos";

const config = new pulumi.Config();
const host = config.require("host");
const machine = new nixos.NixosMachine("web", {
    connection: { host, port: config.requireNumber("port"), privateKey: config.requireSecret("privateKey") },
    flake: config.require("flake"),
    healthChecks: [{ http: config.require("healthUrl"), retries: 5 }],
});
export const systemPath = machine.systemPath;
'''


def test_typescript_program_with_the_npm_tarball(dist: Path, user: UserProject, new_host: HostFactory,
                                                 systems: Systems) -> None:
    tarball = dist / f"pulumi-nixos-nixos-{VERSION}.tgz"
    # The versions scripts/setup-node.sh installs, so npm finds them in its cache.
    package = {"name": "tarball-user", "main": "index.ts",
               "dependencies": {"@pulumi/pulumi": "3.259.0", "@pulumi-nixos/nixos": f"file:{tarball}"},
               "devDependencies": {"typescript": "4.9.5", "ts-node": "10.9.2", "@types/node": "20.19.1"}}
    (user.dir / "package.json").write_text(json.dumps(package, indent=2))
    (user.dir / "tsconfig.json").write_text(json.dumps(
        {"compilerOptions": {"strict": True, "target": "es2020", "module": "commonjs", "moduleResolution": "node",
                             "skipLibCheck": True}, "files": ["index.ts"]}))
    (user.dir / "index.ts").write_text(TYPESCRIPT_PROGRAM)
    (user.dir / "Pulumi.yaml").write_text("name: tarball-user\nruntime:\n  name: nodejs\n"
                                          "  options:\n    typescript: true\n")
    run(["npm", "install", "--prefer-offline", "--no-audit", "--no-fund", "--loglevel=error"], user.dir, user.env)
    installed = json.loads((user.dir / "node_modules" / "@pulumi-nixos" / "nixos" / "package.json").read_text())
    assert installed["version"] == VERSION and installed["pulumi"]["version"] == VERSION
    user.install_plugin(dist)
    host = new_host()
    outputs = user.deploy_web(host)
    assert outputs["systemPath"] == systems["web"] == current_system(host)


GO_PROGRAM = '''\
package main

import (
	"github.com/pulumi-nixos/pulumi-nixos/sdk/go/nixos"
	"github.com/pulumi/pulumi/sdk/v3/go/pulumi"
)

func main() {
	pulumi.Run(func(ctx *pulumi.Context) error {
		machine, err := nixos.NewNixosMachine(ctx, "web", &nixos.NixosMachineArgs{
			Connection: &nixos.ConnectionArgs{Host: pulumi.String("127.0.0.1")},
			Flake:      pulumi.String(".#web"),
		})
		if err != nil {
			return err
		}
		ctx.Export("systemPath", machine.SystemPath)
		return nil
	})
}
'''


def test_go_program_builds_against_the_versioned_module(dist: Path, tmp_path: Path) -> None:
    """No Go language host can be built here (scripts/gen-sdk.sh), so the Go SDK is resolved at its
    version through a module proxy laid out by `make dist` and compiled into a program, not run."""
    program = tmp_path / "go-user"
    program.mkdir()
    (program / "main.go").write_text(GO_PROGRAM)
    usual_proxy = run(["go", "env", "GOPROXY"], program, dict(os.environ)).stdout.strip()
    env = {**os.environ, "GOPROXY": f"file://{dist / 'goproxy'},{usual_proxy}",
           "GONOSUMDB": GO_MODULE, "GOFLAGS": "-mod=mod"}
    run(["go", "mod", "init", "example.com/go-user"], program, env)
    run(["go", "get", f"{GO_MODULE}@v{VERSION}", "github.com/pulumi/pulumi/sdk/v3@v3.259.0"], program, env)
    run(["go", "build", "-o", "program", "."], program, env)
    assert (program / "program").is_file()
    listed = run(["go", "list", "-m", "-json", GO_MODULE], program, env).stdout
    assert json.loads(listed)["Version"] == f"v{VERSION}"
