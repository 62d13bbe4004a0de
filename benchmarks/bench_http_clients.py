"""Why download_images fetches on an event loop with its own HTTP/1.1 client: requests + threads vs one
aiohttp event loop vs mmprep's fetcher (download/fetcher.py: asyncio Protocol + httptools), fetch only.

One command::

    /work/main/.venv/bin/python benchmarks/bench_http_clients.py [--urls 4000] [--concurrency 128]

Both clients fetch the same URLs (~75 KB JPEGs, 20-200 ms latency, loopback host in a separate process) with
the same number of requests in flight: requests with one pooled ``Session`` per thread in a thread pool
(how img2dataset and a "requests" design work), aiohttp with one pooled session on one event loop (what the
downloader used before), and mmprep's ``Fetcher`` on the same kind of loop (uvloop where installed, for both
event-loop clients). Each runs in its own subprocess; the script prints images/s, CPU seconds per 1,000
images, and the ratios against requests + threads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CLIENT_REQUESTS = r"""
import sys, time, threading, json, resource, requests
from concurrent.futures import ThreadPoolExecutor
urls = json.load(open(sys.argv[1])); concurrency = int(sys.argv[2])
local = threading.local()
def fetch(url):
    session = getattr(local, "s", None)
    if session is None:
        session = local.s = requests.Session()
    r = session.get(url, timeout=10)
    return len(r.content) if r.status_code == 200 else 0
start = time.perf_counter(); cpu = time.process_time()
with ThreadPoolExecutor(concurrency) as pool:
    ok = sum(1 for n in pool.map(fetch, urls) if n)
print(json.dumps({"ok": ok, "wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}))
"""

# Runs the client script's ``main()`` coroutine (uvloop where installed, as the stage does) and prints the
# same JSON line as the threaded client.
ASYNC_RUN = r"""
start = time.perf_counter(); cpu = time.process_time()
try:
    import uvloop
    ok = uvloop.run(main())
except ImportError:
    ok = asyncio.run(main())
print(json.dumps({"ok": ok, "wall": time.perf_counter() - start, "cpu": time.process_time() - cpu,
                  "errors": errors}))
"""

CLIENT_AIOHTTP = r"""
import sys, time, json, asyncio, aiohttp
urls = json.load(open(sys.argv[1])); concurrency = int(sys.argv[2]); errors = {}
async def main():
    it = iter(urls); ok = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        async def worker():
            nonlocal ok
            for url in it:
                async with session.get(url) as r:
                    body = await r.read()
                    ok += bool(body) and r.status == 200
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok
""" + ASYNC_RUN

CLIENT_MMPREP = r"""
import sys, time, json, asyncio, dataclasses
sys.path.insert(0, sys.argv[3])
from airflow_provider_mmprep.download.fetcher import Fetcher
from airflow_provider_mmprep.download.options import parse_options
urls = json.load(open(sys.argv[1])); concurrency = int(sys.argv[2])
options = dataclasses.replace(parse_options({"timeout": 10}, threads=concurrency, processes=1),
                              allow_private_addresses=True, max_connections_per_host=concurrency)
errors = {}
async def main():
    it = iter(urls); ok = 0
    async with Fetcher(options, concurrency=concurrency) as fetcher:
        async def worker():
            nonlocal ok
            for url in it:
                result = await fetcher.fetch(url)
                ok += bool(result.body)
                if result.error:
                    errors[result.error] = errors.get(result.error, 0) + 1
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok
""" + ASYNC_RUN

HOST = r"""
import sys, json, time
sys.path.insert(0, sys.argv[3])
from airflow_provider_mmprep.testing.image_host import ImageHost
from airflow_provider_mmprep.testing import sample_data
with ImageHost(latency=(0.02, 0.2), seed=2) as host:
    urls = sample_data.add_images(host, int(sys.argv[2]), distinct=200)
    json.dump(urls, open(sys.argv[1], "w"))
    print("ready", flush=True)
    sys.stdin.read()
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--urls", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    url_file = Path(f"/tmp/bench_http_clients_{os.getpid()}.json")
    host = subprocess.Popen([sys.executable, "-c", HOST, str(url_file), str(args.urls), str(REPO)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert host.stdout is not None and host.stdout.readline().strip() == "ready"
    clients = (("requests+threads", CLIENT_REQUESTS), ("aiohttp", CLIENT_AIOHTTP), ("mmprep", CLIENT_MMPREP))
    results: dict[str, list[dict]] = {name: [] for name, _code in clients}
    try:
        for _ in range(args.repeat):
            for name, code in clients:
                out = subprocess.run([sys.executable, "-c", code, str(url_file), str(args.concurrency), str(REPO)],
                                     capture_output=True, text=True, check=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                results[name].append(result)
                print(f"  {name:17s}: {result['ok']} images in {result['wall']:.2f}s = "
                      f"{result['ok'] / result['wall']:.0f} img/s, {1000 * result['cpu'] / result['ok']:.2f} "
                      f"CPU s per 1000 images{' ' + str(result['errors']) if result.get('errors') else ''}",
                      flush=True)
    finally:
        host.stdin.close()  # type: ignore[union-attr]
        host.wait()
        url_file.unlink(missing_ok=True)
    best = {name: max(r["ok"] / r["wall"] for r in rs) for name, rs in results.items()}
    cpu = {name: min(r["cpu"] / r["ok"] for r in rs) * 1000 for name, rs in results.items()}
    for name in ("aiohttp", "mmprep"):
        print(f"{name} / requests+threads: {best[name] / best['requests+threads']:.2f}x images/s, "
              f"{cpu['requests+threads'] / cpu[name]:.2f}x less CPU per image "
              f"(concurrency {args.concurrency}, cpus={os.cpu_count()})")
    print(f"mmprep's fetcher / aiohttp: {cpu['mmprep'] / cpu['aiohttp']:.2f} of the CPU per image")


if __name__ == "__main__":
    main()
