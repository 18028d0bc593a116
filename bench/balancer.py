"""nginx in front of API replicas on loopback, configured by the shipped deploy/nginx/mpserve.conf.

The tests and bench/scaleout.py run the very file a deployment includes: `render` fills in the replicas and
the port at its markers and wraps it in a main configuration of its own (pid, logs and temp files in one
folder, no daemon, one worker process), so nginx runs as any user without touching /etc or /var.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "deploy" / "nginx" / "mpserve.conf"


def nginx_binary() -> str:
    """nginx's path (Debian puts it in /usr/sbin, outside a user's PATH), or a clear error."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if os.access(p, os.X_OK)), None)
    if found is None:
        raise FileNotFoundError("nginx not found: install Debian's nginx-light (scripts/bootstrap.sh --test does)")
    return found


def render(replicas: list[str], port: int, shipped: str | None = None) -> str:
    """The shipped snippet with ``replicas`` (host:port) as its upstream servers and ``port`` as its listener."""
    text = SHIPPED.read_text() if shipped is None else shipped
    servers = "".join(f"    server {r} max_fails=1 fail_timeout=5s;\n" for r in replicas)
    out = []
    for line in text.splitlines(keepends=True):
        if "# @replicas" in line:
            out.append(servers)
        elif "# @listen" in line:
            out.append(f"    listen 127.0.0.1:{port};\n")
        else:
            out.append(line)
    return "".join(out)


def main_config(folder: Path, snippet: Path) -> str:
    """A whole nginx.conf around ``snippet``: everything it writes stays in ``folder``."""
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root nginx would switch its workers to nobody
    temp = "".join(f"    {kind}_temp_path {folder / kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                        "scgi"))
    return (f"{user}worker_processes 1;\ndaemon off;\npid {folder / 'nginx.pid'};\n"
            f"error_log {folder / 'error.log'} warn;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n    access_log off;\n{temp}    include {snippet};\n}}\n")


class Nginx:
    """An nginx process balancing ``replicas``; ``url`` once `start` returns. Use as a context manager."""

    def __init__(self, folder: Path, replicas: list[str], port: int) -> None:
        self.folder, self.replicas, self.port = Path(folder), replicas, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> Nginx:
        self.folder.mkdir(parents=True, exist_ok=True)
        snippet = self.folder / "mpserve.conf"
        snippet.write_text(render(self.replicas, self.port))
        conf = self.folder / "nginx.conf"
        conf.write_text(main_config(self.folder, snippet))
        binary = nginx_binary()
        check = subprocess.run([binary, "-t", "-p", str(self.folder), "-c", str(conf)], capture_output=True,
                               text=True, timeout=30)
        if check.returncode:
            raise RuntimeError(f"nginx refused its configuration: {check.stderr.strip()}")
        self.proc = subprocess.Popen([binary, "-p", str(self.folder), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            self._wait_answering(timeout_s)
        except BaseException:
            self.stop()  # a start that fails leaves no nginx behind
            raise
        return self

    def _wait_answering(self, timeout_s: float) -> None:
        """Until nginx answers /healthz (from whichever replica it picks), or a clear error."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: see {self.folder / 'error.log'}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        raise TimeoutError(f"nginx did not answer on {self.url} within {timeout_s:.0f} s")

    def pids(self) -> list[int]:
        """The master and its worker processes (CPU figures count them all)."""
        assert self.proc is not None
        out = [self.proc.pid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(stat.parent.name))
            except (OSError, ValueError, IndexError):
                continue  # a process that ended meanwhile
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown (SIGTERM), workers included
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
