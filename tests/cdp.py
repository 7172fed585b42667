"""A minimal Chrome DevTools Protocol client for headless Chromium (test helper, not a test module).

Starts ``chromium --headless=new`` with ``--remote-debugging-port=0`` (Chromium picks a free port on
127.0.0.1 and writes it to ``DevToolsActivePort`` in its profile folder), attaches to its page over
the websocket NNI already depends on, and offers what the web-UI test needs: navigate, evaluate
JavaScript, wait for a condition, click, screenshot. The browser is stopped by its PID.
"""
from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Dict, Optional

from harness import stop_group

CHROMIUM_FLAGS = ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--hide-scrollbars',
                  '--no-first-run', '--no-default-browser-check', '--disable-extensions', '--disable-sync',
                  '--disable-background-networking', '--disable-component-update', '--mute-audio',
                  '--remote-debugging-address=127.0.0.1', '--remote-debugging-port=0')


def find_chromium() -> Optional[str]:
    """Debian's ``chromium`` (or another Chromium/Chrome on PATH); ``$BNAS_CHROMIUM`` wins."""
    for name in (os.environ.get('BNAS_CHROMIUM'), 'chromium', 'chromium-browser', 'google-chrome'):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class CDPError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium with one page, driven over the DevTools protocol."""

    def __init__(self, profile_dir: str | os.PathLike, *, executable: Optional[str] = None,
                 width: int = 1440, height: int = 1000, timeout: float = 60) -> None:
        from websockets.sync.client import connect

        self.profile_dir = Path(profile_dir)
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        exe = executable or find_chromium()
        if exe is None:
            raise CDPError('no chromium executable found')
        (self.profile_dir / 'DevToolsActivePort').unlink(missing_ok=True)     # a stale one names a dead port
        self.log_path = self.profile_dir / 'chromium.log'
        self._log = open(self.log_path, 'wb')
        self.proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f'--user-data-dir={self.profile_dir}',
                                      f'--window-size={width},{height}', 'about:blank'],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._ids = itertools.count(1)
        try:
            port = self._wait_port(timeout)
            page = self._wait_page(port, timeout)
            self.ws = connect(page['webSocketDebuggerUrl'], max_size=None, open_timeout=timeout)
            self.call('Page.enable')
            self.call('Runtime.enable')
            self.call('Emulation.setDeviceMetricsOverride', width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- start-up

    def _wait_port(self, timeout: float) -> int:
        marker = self.profile_dir / 'DevToolsActivePort'
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CDPError(f'chromium exited with {self.proc.returncode}; see {self.log_path}')
            if marker.is_file():
                first = marker.read_text().splitlines()[:1]
                if first and first[0].isdigit():
                    return int(first[0])
            time.sleep(0.1)
        raise CDPError(f'chromium did not open its DevTools port within {timeout:.0f} s')

    def _wait_page(self, port: int, timeout: float) -> Dict[str, Any]:
        # On a loaded machine Chromium may open its DevTools port without ever listing the about:blank page
        # of its command line; after a few seconds ask it for a new page (PUT /json/new) instead of waiting.
        start = time.monotonic()
        deadline, asked = start + timeout, False
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f'http://127.0.0.1:{port}/json/list', timeout=5) as resp:  # noqa: S310
                    pages = [t for t in json.loads(resp.read()) if t.get('type') == 'page']
                if pages:
                    return pages[0]
                if not asked and time.monotonic() - start > 5:
                    asked = True
                    new_page = urllib.request.Request(f'http://127.0.0.1:{port}/json/new?about:blank', method='PUT')
                    with urllib.request.urlopen(new_page, timeout=5) as resp:  # noqa: S310
                        target = json.loads(resp.read())
                    if target.get('type') == 'page' and target.get('webSocketDebuggerUrl'):
                        return target
            except OSError:
                pass
            time.sleep(0.2)
        raise CDPError(f'chromium has no page target; see {self.log_path}')

    # ----------------------------------------------------------------- protocol

    def call(self, method: str, timeout: float = 60, **params: Any) -> Dict[str, Any]:
        """Send one command and return its result (events received meanwhile are dropped)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({'id': msg_id, 'method': method, 'params': params}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError(f'{method}: no answer within {timeout:.0f} s')
            reply = json.loads(self.ws.recv(timeout=left))
            if reply.get('id') == msg_id:
                if 'error' in reply:
                    raise CDPError(f'{method}: {reply["error"]}')
                return reply.get('result', {})

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises are awaited)."""
        result = self.call('Runtime.evaluate', expression=expression, returnByValue=True, awaitPromise=True)
        if 'exceptionDetails' in result:
            raise CDPError(f'javascript failed: {result["exceptionDetails"].get("text")} in {expression[:80]!r}')
        return result.get('result', {}).get('value')

    def navigate(self, url: str) -> None:
        self.call('Page.navigate', url=url)
        self.wait_for('document.readyState === "complete"', timeout=60)

    def wait_for(self, expression: str, timeout: float = 60, poll: float = 0.25) -> Any:
        """Poll a JavaScript expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise CDPError(f'timed out after {timeout:.0f} s waiting for {expression[:120]!r}')
            time.sleep(poll)

    def text(self) -> str:
        return self.evaluate('document.body ? document.body.innerText : ""') or ''

    def screenshot(self, path: str | os.PathLike) -> Path:
        data = self.call('Page.captureScreenshot', format='png', captureBeyondViewport=False)['data']
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path

    # ----------------------------------------------------------------- shutdown

    def close(self) -> None:
        """Close the socket and stop the browser's process group by PID."""
        ws = getattr(self, 'ws', None)
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - the browser may be gone already
                pass
        if self.proc.poll() is None:
            stop_group(self.proc, grace=5)
        self._log.close()

    def __enter__(self) -> 'Chromium':
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
