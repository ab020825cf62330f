"""The machinery of the compose test (tests/test_compose.py): packages, a Docker engine of its own,
the local base image, the image builds and docker-compose.

The machines this runs on (CI's, the developers') reach package registries but no image registry,
so nothing can be pulled:
- the engine is Debian's docker.io, started here with its own socket, data root, exec root and pid
  file, no iptables rules and no docker0 bridge, and stopped by its pid at the end; its data root
  (images, volumes, build cache) is then deleted;
- the image that deploy/Dockerfile starts FROM is made locally: `debootstrap` from the Debian mirror
  that apt uses, then `docker import`, tagged with that name. Its root file system is cached as a
  tarball keyed by its recipe ($FEDSQUEEZE_CACHE/compose-test/base-KEY.tar) and reused while the
  recipe, the mirror and the host's extra CA certificates are unchanged;
- the builds run on the host network. The intercepting proxy's CA certificates go into the local
  base image's trust store, with PIP_CERT pointing at it, never into deploy/Dockerfile; the CPU torch
  wheel is served from 127.0.0.1 as the Dockerfile's TORCH_INDEX_URL.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
TEST_OVERRIDE = DEPLOY / "docker-compose.test.yml"
PROMETHEUS_DOCKERFILE = DEPLOY / "compose-test" / "prometheus.Dockerfile"
CACHE = Path(os.environ.get("FEDSQUEEZE_CACHE", Path.home() / ".cache" / "fedsqueeze")) / "compose-test"

# The command each needed package provides, and where it is looked for besides PATH.
APT_PACKAGES = {"dockerd": "docker.io", "docker-compose": "docker-compose", "debootstrap": "debootstrap"}
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# The local stand-in for the python:3.11-slim-bookworm image; bump "revision" when the steps of
# `_make_rootfs` change, so that the cached tarball is rebuilt.
BASE_RECIPE: dict[str, Any] = {
    "suite": "bookworm",
    "variant": "minbase",
    "include": ["ca-certificates", "python3", "python3-venv", "python-is-python3"],
    "revision": 1,
}
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
HOST_EXTRA_CAS = Path("/usr/local/share/ca-certificates")
# Like the Debian slim images: no manuals, translations or documentation beyond the copyrights.
DPKG_SLIM = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""


class HarnessError(RuntimeError):
    """A step of the compose test's set-up failed; the message says which and shows its output."""


def log(message: str) -> None:
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run(
    cmd: Sequence[str | Path],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = True,
    output: Path | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing stdout and stderr together (also into `output`, when given)."""
    args = [str(c) for c in cmd]
    try:
        proc = subprocess.run(
            args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"timed out after {timeout:.0f} s: {' '.join(args)}") from exc
    text = proc.stdout + proc.stderr
    if output is not None:
        with output.open("a") as f:
            f.write(f"$ {' '.join(args)}\n{text}\n")
    if check and proc.returncode != 0:
        raise HarnessError(f"exit {proc.returncode}: {' '.join(args)}\n{tail(text)}")
    return proc


def find_command(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in SBIN:
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    return None


def ensure_packages() -> dict[str, str]:
    """Install the Debian packages that are missing (quietly, as root); returns {command: path}."""
    missing = [pkg for command, pkg in APT_PACKAGES.items() if find_command(command) is None]
    if missing:
        if os.geteuid() != 0:
            raise HarnessError(
                f"the compose test needs {', '.join(missing)}: run it as root, or `apt-get install {' '.join(missing)}`"
            )
        log(f"installing {', '.join(missing)} (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(["apt-get", "update", "-qq"], env=env, timeout=900)
        run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], env=env, timeout=900)
    paths = {command: find_command(command) for command in APT_PACKAGES}
    absent = [c for c, p in paths.items() if p is None]
    if absent:
        raise HarnessError(f"still missing after apt-get install: {', '.join(absent)}")
    return {c: str(p) for c, p in paths.items()}


def docker_cli() -> str:
    """docker.io's own client (it builds with BuildKit without the buildx plugin), else the one on PATH."""
    packaged = Path("/usr/bin/docker")
    found = str(packaged) if packaged.exists() else shutil.which("docker")
    if found is None:
        raise HarnessError("no docker client: the docker.io package provides /usr/bin/docker")
    return found


class DockerEngine:
    """A dockerd of this test's own: private socket, data root, exec root and pid file.

    No iptables rules, no IP forwarding and no default bridge: containers reach only the networks
    compose makes (and the host through published ports); builds use the host network. `stop` ends it
    by its pid, then whatever is left of its containerd, and deletes its folder."""

    def __init__(self, dockerd: str) -> None:
        self.dockerd = dockerd
        self.cli = docker_cli()
        # Short: unix socket paths are limited to 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="fsq-docker-", dir="/tmp"))
        self.socket = self.root / "docker.sock"
        self.log_path = self.root / "dockerd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.socket}", "DOCKER_BUILDKIT": "1"}

    def start(self, timeout: float = 90) -> DockerEngine:
        cmd = [
            self.dockerd,
            f"--data-root={self.root / 'data'}",
            f"--exec-root={self.root / 'exec'}",
            f"--pidfile={self.root / 'dockerd.pid'}",
            f"--host=unix://{self.socket}",
            "--bridge=none",
            "--iptables=false",
            "--ip-forward=false",
        ]
        with self.log_path.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(
                    f"dockerd exited with {self.proc.returncode}:\n{tail(self.log_path.read_text())}"
                )
            if (
                self.docker("version", "--format", "{{.Server.Version}}", check=False, timeout=10).returncode
                == 0
            ):
                break
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"dockerd not ready after {timeout:.0f} s:\n{tail(self.log_path.read_text())}"
                )
            time.sleep(0.3)
        version = self.docker("version", "--format", "{{.Server.Version}}").stdout.strip()
        log(f"dockerd {version} (pid {self.proc.pid}) on {self.socket}")
        return self

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return run([self.cli, *args], env=self.env, check=check, timeout=timeout)

    def _leftover_pids(self) -> list[int]:
        """Processes started for this engine (containerd, shims): their command line names its folder."""
        mine = str(self.root).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if mine in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            log(f"dockerd (pid {self.proc.pid}) stopped")
        for pid in self._leftover_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        for mount in reversed([m for m in mounts if m.startswith(str(self.root))]):
            subprocess.run(["umount", "-l", mount], capture_output=True, check=False)
        # Images, volumes, build cache: gigabytes of small files, which rm deletes faster than rmtree.
        # --one-file-system: never through a mount that survived the umount above.
        subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)], capture_output=True, check=False)


# -- the local base image ---------------------------------------------------------------------------
def from_images(dockerfile: Path) -> list[str]:
    """The external images a Dockerfile starts FROM (not its own stages, not ARG-named ones)."""
    stages: set[str] = set()
    images: list[str] = []
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            image, stage = m.group(1), m.group(2)
            if image not in stages and "$" not in image and image not in images:
                images.append(image)
            if stage:
                stages.add(stage)
    return images


def dockerfile_arg(dockerfile: Path, name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", dockerfile.read_text(), re.MULTILINE)
    if not m:
        raise HarnessError(f"{dockerfile} has no `ARG {name}=...`")
    return m.group(1)


def apt_mirror() -> str:
    """The first Debian mirror apt uses on this machine (deb822 sources or sources.list)."""
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    for path in candidates:
        with contextlib.suppress(OSError):
            text = path.read_text()
            m = re.search(r"^URIs:\s*(\S+/debian)/?\s*$", text, re.MULTILINE) or re.search(
                r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)/?\s", text, re.MULTILINE
            )
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def host_extra_cas() -> list[Path]:
    return sorted(HOST_EXTRA_CAS.rglob("*.crt")) if HOST_EXTRA_CAS.is_dir() else []


def base_key(mirror: str) -> str:
    digest = hashlib.sha256(json.dumps({**BASE_RECIPE, "mirror": mirror}, sort_keys=True).encode())
    for ca in host_extra_cas():
        digest.update(ca.name.encode() + b"\0" + ca.read_bytes())
    return digest.hexdigest()[:16]


def _make_rootfs(rootfs: Path, mirror: str, output: Path) -> None:
    r = BASE_RECIPE
    run(["debootstrap", f"--variant={r['variant']}", f"--include={','.join(r['include'])}", r["suite"], rootfs, mirror],
        output=output, timeout=1200)  # fmt: skip
    for path in list((rootfs / "var/cache/apt/archives").glob("*.deb")) + list(
        (rootfs / "var/lib/apt/lists").glob("*_*")
    ):
        path.unlink()
    (rootfs / "etc/dpkg/dpkg.cfg.d/slim").write_text(DPKG_SLIM)
    for folder in ("usr/share/man", "usr/share/info", "usr/share/locale"):
        for child in (rootfs / folder).iterdir():
            if child.name != "locale.alias":
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    for doc in (rootfs / "usr/share/doc").glob("*/*"):
        if doc.name != "copyright":
            shutil.rmtree(doc) if doc.is_dir() and not doc.is_symlink() else doc.unlink()
    # No services start inside an image build (Debian's prometheus package would try).
    policy = rootfs / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    # The host's extra CA certificates (an intercepting proxy), for pip inside the builds.
    for ca in host_extra_cas():
        shutil.copy(ca, rootfs / "usr/local/share/ca-certificates" / ca.name)
    run(["chroot", rootfs, "update-ca-certificates"], output=output)


def base_image(engine: DockerEngine, output: Path) -> tuple[str, list[str], bool]:
    """Import the cached base tarball (built first if needed) and tag it as deploy/Dockerfile's FROM.

    Returns (its own tag, the FROM names it was tagged as, whether it was built now)."""
    wanted = from_images(DEPLOY / "Dockerfile")
    for name in wanted:
        m = re.match(r"python:(\d+\.\d+)", name)
        if not m or "bookworm" not in name:
            raise HarnessError(
                f"the local base image stands in for python:3.11-...-bookworm only, not {name}"
            )
    mirror = apt_mirror()
    key = base_key(mirror)
    tarball = CACHE / f"base-{key}.tar"
    built = False
    if not tarball.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        for stale in CACHE.glob("base-*.tar"):
            stale.unlink()
        rootfs = CACHE / f"rootfs-{key}"
        shutil.rmtree(rootfs, ignore_errors=True)
        log(f"building the local base image with debootstrap ({BASE_RECIPE['suite']} from {mirror})")
        t0 = time.monotonic()
        try:
            _make_rootfs(rootfs, mirror, output)
            partial = tarball.with_suffix(".partial")
            run(["tar", "-C", rootfs, "--numeric-owner", "-cf", partial, "."], output=output, timeout=600)
            partial.rename(tarball)
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        built = True
        log(
            f"base root file system: {tarball.stat().st_size / 2**20:.0f} MiB in {time.monotonic() - t0:.0f} s (cached as {tarball})"
        )
    else:
        log(f"reusing the local base image {tarball}")
    tag = f"fedsqueeze-compose-test/base:{key}"
    changes = ["ENV LANG=C.UTF-8", f"ENV PIP_CERT={SYSTEM_BUNDLE}", f"ENV REQUESTS_CA_BUNDLE={SYSTEM_BUNDLE}",
               f"ENV SSL_CERT_FILE={SYSTEM_BUNDLE}", 'CMD ["python3"]']  # fmt: skip
    args = [engine.cli, "import", *(a for c in changes for a in ("--change", c)), str(tarball), tag]
    run(args, env=engine.env, output=output, timeout=600)
    python = engine.docker(
        "run",
        "--rm",
        "--network",
        "none",
        tag,
        "python",
        "-c",
        "import sys, venv; print('%d.%d' % sys.version_info[:2])",
    ).stdout.strip()
    for name in wanted:
        if not name.startswith(f"python:{python}"):
            raise HarnessError(f"the local base has Python {python}, deploy/Dockerfile wants {name}")
        engine.docker("tag", tag, name)
    return tag, wanted, built


# -- the CPU torch wheel, served to the build --------------------------------------------------------
def torch_wheel(version: str, output: Path) -> Path:
    """The CPU wheel of torch==VERSION, through this machine's pip configuration (else the CPU index)."""
    folder = CACHE / "torch-index" / "torch"
    found = sorted(folder.glob(f"torch-{version}+cpu-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    base = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(folder),
    ]
    proc = run([*base, f"torch=={version}+cpu"], output=output, check=False, timeout=1200)
    if proc.returncode != 0:
        run(
            [*base, "--index-url", "https://download.pytorch.org/whl/cpu", f"torch=={version}"],
            output=output,
            timeout=1200,
        )
    found = sorted(folder.glob(f"torch-{version}*.whl"))
    if not found:
        raise HarnessError(f"pip downloaded no torch {version} wheel into {folder}")
    return found[0]


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve `folder` on 127.0.0.1 (a free port) while the block runs; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def build(
    engine: DockerEngine, dockerfile: Path, context: Path, tag: str, build_args: dict[str, str], output: Path
) -> float:
    """`docker build` on the host network (BuildKit); returns the seconds it took."""
    t0 = time.monotonic()
    args = ["build", "--network=host", "--progress=plain", "-f", str(dockerfile), "-t", tag]
    for key, value in build_args.items():
        args += ["--build-arg", f"{key}={value}"]
    run([engine.cli, *args, str(context)], env=engine.env, output=output, timeout=1800)
    return time.monotonic() - t0


# -- docker-compose ---------------------------------------------------------------------------------
class Compose:
    """docker-compose on the deployment's file and the test override, as one project."""

    def __init__(
        self, engine: DockerEngine, compose: str, project: str, env: dict[str, str], output: Path
    ) -> None:
        self.engine = engine
        self.project = project
        self.base = [
            compose,
            "--ansi",
            "never",
            "-p",
            project,
            "-f",
            str(COMPOSE_FILE),
            "-f",
            str(TEST_OVERRIDE),
        ]
        self.env = {**engine.env, **env}
        self.output = output

    def __call__(
        self, *args: str, timeout: float = 600, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run([*self.base, *args], env=self.env, timeout=timeout, check=check, output=self.output)

    def containers(self, service: str | None = None, *, running_only: bool = False) -> list[str]:
        filters = ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        out = self.engine.docker(
            "ps", *([] if running_only else ["-a"]), "--no-trunc", "--format", "{{.ID}}", *filters
        ).stdout
        return out.split()

    def inspect(self, container: str) -> dict[str, Any]:
        return json.loads(self.engine.docker("inspect", container).stdout)[0]  # type: ignore[no-any-return]

    def read(self, container: str, path: str) -> str | None:
        proc = self.engine.docker("exec", container, "cat", path, check=False, timeout=30)
        return proc.stdout if proc.returncode == 0 else None

    def logs(self, container: str, lines: int = 60) -> str:
        proc = self.engine.docker("logs", "--tail", str(lines), container, check=False)
        return proc.stdout + proc.stderr


def http_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
