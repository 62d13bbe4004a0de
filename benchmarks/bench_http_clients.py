"""Why download_images fetches with aiohttp: requests + threads vs one aiohttp event loop, fetch only.

One command::

    /work/main/.venv/bin/python benchmarks/bench_http_clients.py [--urls 4000] [--concurrency 128]

Both clients fetch the same URLs (~75 KB JPEGs, 20-200 ms latency, loopback host in a separate process) with
the same number of requests in flight: requests with one pooled ``Session`` per thread in a thread pool
(how img2dataset and a "requests" design work), aiohttp with one pooled session on one event loop. Each runs
in its own subprocess; the script prints images/s, CPU seconds per 1,000 images, and the ratio.
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

CLIENT_AIOHTTP = r"""
import sys, time, json, asyncio, aiohttp
urls = json.load(open(sys.argv[1])); concurrency = int(sys.argv[2])
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
start = time.perf_counter(); cpu = time.process_time()
ok = asyncio.run(main())
print(json.dumps({"ok": ok, "wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}))
"""

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
    results: dict[str, list[dict]] = {"requests+threads": [], "aiohttp": []}
    try:
        for _ in range(args.repeat):
            for name, code in (("requests+threads", CLIENT_REQUESTS), ("aiohttp", CLIENT_AIOHTTP)):
                out = subprocess.run([sys.executable, "-c", code, str(url_file), str(args.concurrency)],
                                     capture_output=True, text=True, check=True).stdout
                result = json.loads(out.strip().splitlines()[-1])
                results[name].append(result)
                print(f"  {name:17s}: {result['ok']} images in {result['wall']:.2f}s = "
                      f"{result['ok'] / result['wall']:.0f} img/s, {1000 * result['cpu'] / result['ok']:.2f} "
                      f"CPU s per 1000 images", flush=True)
    finally:
        host.stdin.close()  # type: ignore[union-attr]
        host.wait()
        url_file.unlink(missing_ok=True)
    best = {name: max(r["ok"] / r["wall"] for r in rs) for name, rs in results.items()}
    cpu = {name: min(r["cpu"] / r["ok"] for r in rs) * 1000 for name, rs in results.items()}
    print(f"aiohttp / requests+threads: {best['aiohttp'] / best['requests+threads']:.2f}x images/s, "
          f"{cpu['requests+threads'] / cpu['aiohttp']:.2f}x less CPU per image "
          f"(concurrency {args.concurrency}, cpus={os.cpu_count()})")


if __name__ == "__main__":
    main()
