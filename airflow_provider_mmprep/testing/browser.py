"""Headless Chromium for render checks and screenshots (the report test; README screenshots of the demo).

Chromium is launched the one way that works in containers and CI without network side effects: headless, no
sandbox (root in a container), no GPU, no background networking, and a fresh profile per launch so no state
leaks between runs. Install it with the system package manager (Debian: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary on PATH, or None."""
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def run_chromium(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium with ``args`` in a throw-away profile; raises FileNotFoundError without one."""
    binary = find_chromium()
    if binary is None:
        raise FileNotFoundError("chromium not found on PATH (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="mmprep-chromium-") as profile:
        return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def dump_dom(url: str, virtual_time_ms: int = 5000) -> str:
    """The DOM after load (scripts run, images decoded within the virtual time budget)."""
    return run_chromium(f"--virtual-time-budget={virtual_time_ms}", "--dump-dom", url).stdout


def screenshot(url: str, out_png: str | Path, width: int = 1200, height: int = 2400) -> Path:
    """PNG screenshot of ``url`` (e.g. ``Path(...).as_uri()`` or an http://127.0.0.1 page) at that size."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    result = run_chromium(f"--window-size={width},{height}", f"--screenshot={out_png}", url)
    if not out_png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot: {result.stderr[-2000:]}")
    return out_png
