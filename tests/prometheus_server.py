"""A real Prometheus server for the tests: found on PATH, or installed from Debian's package.

`make prometheus` and .ci/run install it up front; `ensure_prometheus` installs it itself when it
is missing and we are root with apt-get, and otherwise says why it cannot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

APT_TIMEOUT_S = 600


def ensure_prometheus() -> tuple[str | None, str]:
    """(path of the prometheus binary, "") or (None, why it cannot be had)."""
    found = shutil.which("prometheus")
    if found:
        return found, ""
    if shutil.which("apt-get") is None:
        return (
            None,
            "prometheus is not on PATH and there is no apt-get to install Debian's `prometheus` package",
        )
    if os.geteuid() != 0:
        return (
            None,
            "prometheus is not on PATH and installing Debian's `prometheus` package needs root (run `make prometheus` as root)",
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-o",
        "DPkg::Lock::Timeout=300",
        "prometheus",
    ]
    try:
        proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
        if proc.returncode != 0:  # the package lists may be missing or stale
            subprocess.run(
                ["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=300"],
                env=env,
                capture_output=True,
                timeout=APT_TIMEOUT_S,
            )
            proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=APT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"installing Debian's `prometheus` package failed: {exc}"
    found = (
        shutil.which("prometheus")
        or (os.path.exists("/usr/bin/prometheus") and "/usr/bin/prometheus")
        or None
    )
    if not found:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        return (
            None,
            f"`apt-get install prometheus` did not give a prometheus binary (exit {proc.returncode}): {' | '.join(tail)}",
        )
    return found, ""


class Prometheus:
    """A Prometheus process on loopback with its own config and data folder."""

    def __init__(self, binary: str, config: dict[str, Any], folder: Path, port: int) -> None:
        import yaml

        self.url = f"http://127.0.0.1:{port}"
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = folder / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn", "--storage.tsdb.retention.time=1h"],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def version(self) -> str:
        return str(self.get("/api/v1/status/buildinfo")["data"]["version"])

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"prometheus exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus not ready after {timeout} s: {self.log_path.read_text()[-2000:]}")

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as resp:
            data = json.loads(resp.read())
        if data.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {data}")
        return data

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self.get("/api/v1/query", **params)["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def targets(self) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/targets")["data"]["activeTargets"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
