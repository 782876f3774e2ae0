"""Mirror latencies, medians printed (docs/mirror.md, README).

1. socket edit -> the linked file holds it;
2. socket edit -> `mockoon-cli start --watch --polling-interval MS` serves it over HTTP;
3. a file save (editor-style rename) -> the document holds it (read over the socket).

Runs an in-process daemon on a temporary data dir; the mock server listens on 127.0.0.1 only.
Needs `npm ci --prefix tests/interop` for (2) (skipped with a note otherwise).

    .venv/bin/python benchmarks/bench_mirror.py [--samples 30] [--polling-interval 100]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import trio

from peerdaemon.api.client import AsyncClient
from peerdaemon.daemon.supervisor import DaemonConfig, serve

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "mockoon" / "test-env.json"
MOCKOON_CLI = ROOT / "tests" / "interop" / "node_modules" / ".bin" / "mockoon-cli"
BODY = "/routes/1/responses/0/body"


def summary(name: str, values: list[float]) -> None:
    ms = sorted(v * 1000 for v in values)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
    print(f"{name:66s} median {statistics.median(ms):7.1f} ms   p90 {p90:7.1f} ms   (n={len(ms)})")


def http_body(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except (urllib.error.URLError, OSError):
        return None


async def wait_file(path: Path, needle: str, timeout: float = 10.0) -> float:
    start = time.perf_counter()
    while needle not in path.read_text(encoding="utf-8"):
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"{path} never held {needle!r}")
        await trio.sleep(0.002)
    return time.perf_counter() - start


async def main(samples: int, polling_ms: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="pdbm"))
    proc = None
    try:
        data = root / "env.json"
        shutil.copy(FIXTURE, data)
        config = DaemonConfig(data_dir=root / "data", socket_path=root / "pd.sock")
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, config)
            async with await AsyncClient.connect(config.socket_path) as c:
                env_id = (await c.call("env.import_link", json=data.read_text(), path=str(data)))[
                    "id"
                ]

                # 1. socket edit -> file
                to_file = []
                for i in range(samples):
                    marker = f"file-{i}-{time.time_ns()}"
                    start = time.perf_counter()
                    await c.patch(env_id, [{"op": "replace", "path": BODY, "value": marker}])
                    await wait_file(data, marker)
                    to_file.append(time.perf_counter() - start)
                    await trio.sleep(0.1)

                # 3. file save -> document
                to_doc = []
                for i in range(samples):
                    env = json.loads(data.read_text(encoding="utf-8"))
                    marker = f"save-{i}-{time.time_ns()}"
                    env["routes"][1]["responses"][0]["body"] = marker
                    tmp = data.with_name(".env.json.tmp")
                    tmp.write_text(json.dumps(env, indent=2), encoding="utf-8")
                    start = time.perf_counter()
                    os.replace(tmp, data)
                    while (await c.get(env_id, BODY)) != marker:
                        await trio.sleep(0.002)
                    to_doc.append(time.perf_counter() - start)
                    await trio.sleep(0.3)

                # 2. socket edit -> mockoon-cli --watch serving it
                to_http: list[float] = []
                if MOCKOON_CLI.exists() and shutil.which("node"):
                    with socket.socket() as s:
                        s.bind(("127.0.0.1", 0))
                        port = s.getsockname()[1]
                    log = (root / "mockoon.log").open("wb")
                    proc = subprocess.Popen(
                        [
                            "node",
                            str(MOCKOON_CLI),
                            "start",
                            "--data",
                            str(data),
                            "--port",
                            str(port),
                            "--hostname",
                            "127.0.0.1",
                            "--watch",
                            "--polling-interval",
                            str(polling_ms),
                            "--disable-log-to-file",
                            "--disable-admin-api",
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env={**os.environ, "HOME": str(root)},
                    )
                    url = f"http://127.0.0.1:{port}/test2"
                    with trio.fail_after(30):
                        while await trio.to_thread.run_sync(http_body, url) is None:
                            await trio.sleep(0.1)
                    for i in range(max(5, samples // 3)):
                        marker = f"http-{i}-{time.time_ns()}"
                        start = time.perf_counter()
                        await c.patch(env_id, [{"op": "replace", "path": BODY, "value": marker}])
                        with trio.fail_after(20):
                            while await trio.to_thread.run_sync(http_body, url) != marker:
                                await trio.sleep(0.005)
                        to_http.append(time.perf_counter() - start)
                        await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
        print(
            f"peerdaemon mirror latencies (environment: {FIXTURE.name}, {data.stat().st_size} bytes)"
        )
        summary("socket edit -> linked file holds it", to_file)
        if to_http:
            summary(
                f"socket edit -> mockoon-cli --watch serves it ({polling_ms} ms polling)", to_http
            )
        else:
            print("socket edit -> mockoon-cli: skipped (run `npm ci --prefix tests/interop`)")
        summary("file save -> document holds it", to_doc)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument(
        "--polling-interval",
        type=int,
        default=100,
        help="mockoon-cli --polling-interval in ms (its default is 2000)",
    )
    args = parser.parse_args()
    trio.run(main, args.samples, args.polling_interval)
