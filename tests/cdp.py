"""A small Chrome DevTools Protocol client: drive the system's Chromium from tests, no browser download.

    with Browser.launch() as browser:            # None when no chromium binary is installed: see find_chromium()
        browser.navigate("http://127.0.0.1:8001/studio/")
        browser.evaluate("document.title")
        browser.screenshot(Path("page.png"))

Chromium runs headless with ``--remote-debugging-port=0``; the port it picked is read from ``DevToolsActivePort``
in its private profile directory, and the page target is driven over one websocket (``websockets``' sync client).
Every wait is bounded; ``close()`` ends the browser process (terminate, then kill).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """``$P5REC_CHROMIUM`` or the first Chromium/Chrome on PATH, else None."""
    explicit = os.environ.get("P5REC_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in BINARIES:
        found = shutil.which(name)
        if found:
            return found
    return None


class BrowserError(RuntimeError):
    pass


# JS helper every evaluate() can use: waitFor(() => condition, ms) resolves with the first truthy value.
WAIT_FOR = """
const waitFor = async (fn, ms = 20000, what = "condition") => {
  const t0 = Date.now();
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() - t0 > ms) throw new Error("timed out waiting for " + what);
    await new Promise((r) => setTimeout(r, 50));
  }
};
"""


class Browser:
    def __init__(self, process: subprocess.Popen, profile: Path, ws):
        self.process, self.profile, self.ws = process, profile, ws
        self._id = 0

    @classmethod
    def launch(cls, binary: str | None = None, width: int = 1440, height: int = 900,
               timeout: float = 45.0) -> "Browser":
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError("no chromium binary found")
        from websockets.sync.client import connect

        profile = Path(tempfile.mkdtemp(prefix="p5rec-chromium-"))
        process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio",
             f"--window-size={width},{height}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            port = cls._port(process, profile, timeout)
            end = time.monotonic() + timeout
            while True:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                    pages = [t for t in json.load(response) if t.get("type") == "page"]
                if pages:
                    break
                if time.monotonic() > end:
                    raise BrowserError("chromium opened no page")
                time.sleep(0.1)
            # entered as a context manager (websockets >= 17.1 warns otherwise); closed by close()
            ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=timeout).__enter__()
        except BaseException:
            cls._end(process)
            shutil.rmtree(profile, ignore_errors=True)
            raise
        browser = cls(process, profile, ws)
        browser.send("Page.enable")
        browser.send("Runtime.enable")
        browser.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                            "mobile": False})
        return browser

    @staticmethod
    def _port(process: subprocess.Popen, profile: Path, timeout: float) -> int:
        end = time.monotonic() + timeout
        file = profile / "DevToolsActivePort"
        while time.monotonic() < end:
            if process.poll() is not None:
                raise BrowserError(f"chromium exited with status {process.returncode} before it listened")
            if file.exists():
                lines = file.read_text().split()
                if lines and lines[0].isdigit():
                    return int(lines[0])
            time.sleep(0.05)
        raise BrowserError(f"chromium did not open its DevTools port within {timeout:.0f} s")

    # ------------------------------------------------------------------ protocol
    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self._id += 1
        wanted = self._id
        self.ws.send(json.dumps({"id": wanted, "method": method, "params": params or {}}))
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise BrowserError(f"{method}: no answer within {timeout:.0f} s")
            message = json.loads(self.ws.recv(timeout=left))
            if message.get("id") == wanted:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str, timeout: float = 30.0):
        """The value of a JS expression (awaited if a promise); ``waitFor`` is defined for it. A thrown error is
        a :class:`BrowserError` with its message."""
        source = f"(async () => {{ {WAIT_FOR} return await ({expression}); }})()"
        result = self.send("Runtime.evaluate", {"expression": source, "awaitPromise": True, "returnByValue": True,
                                                "timeout": int(timeout * 1000)}, timeout=timeout + 5)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"page script failed: {text}")
        return result.get("result", {}).get("value")

    def navigate(self, url: str, timeout: float = 30.0) -> None:
        self.send("Page.navigate", {"url": url}, timeout=timeout)
        self.evaluate("waitFor(() => document.readyState === 'complete', 20000, 'the page to load')", timeout)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    # ------------------------------------------------------------------ ending
    @staticmethod
    def _end(process: subprocess.Popen) -> None:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self._end(self.process)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
