"""Open the built documentation site in headless Chromium and screenshot it (run by tests/test_docs.py).

It runs as a process of its own, as ``tests/webui_driver.py`` does for the web UI: started from inside a
long-lived pytest worker, Chromium sometimes opened its DevTools port but never showed a page. Here it
starts from a fresh process with the default signal mask, serves the site itself on 127.0.0.1 and exits
non-zero with one line on stderr when a check fails.

    python tests/docs_browser.py --site SITE_DIR --out DIR
"""
from __future__ import annotations

import argparse
import functools
import http.server
import signal
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cdp import Chromium  # noqa: E402

IMAGES_LOADED = ('Array.from(document.images).length > 0 && '
                 'Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)')


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def check_site(url: str, out: Path) -> list:
    """The checks of the site in a browser; returns the screenshot paths."""
    shots = []
    with Chromium(out / 'chromium-profile', width=1280, height=900) as browser:
        browser.navigate(url + '/')
        assert 'bnas-nni brings BNAS' in browser.text(), 'home page: the opening sentence is missing'
        nav = browser.evaluate('Array.from(document.querySelectorAll(".md-nav__link")).map(a => a.innerText)')
        assert any('Getting started' in i for i in nav) and any('Changelog' in i for i in nav), f'nav: {nav}'
        shots.append(browser.screenshot(out / 'docs-home.png'))
        browser.navigate(url + '/guides/search/')
        h1 = browser.evaluate('document.querySelector("h1").innerText')
        assert h1.startswith('Search'), f'search guide: h1 is {h1!r}'
        assert 'bnas-nni search --config experiments/search_quick_fashion.yaml' in browser.text(), \
            'search guide: the quick search command is missing'
        shots.append(browser.screenshot(out / 'docs-guide-search.png'))
        for page in ('/concepts/space/', '/guides/nni/'):            # the cell pictures, the web-UI screenshot
            browser.navigate(url + page)
            browser.wait_for(IMAGES_LOADED, timeout=30)
    return shots


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--site', required=True, help='the built site (mkdocs build --site-dir)')
    parser.add_argument('--out', required=True, help='folder for the screenshots and the browser profile')
    args = parser.parse_args()
    signal.pthread_sigmask(signal.SIG_SETMASK, [])          # Chromium's zygote waits on its children
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0),
                                             functools.partial(_QuietHandler, directory=str(args.site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        for shot in check_site(f'http://127.0.0.1:{server.server_address[1]}', out):
            print(shot)
    except (AssertionError, RuntimeError) as exc:
        print(f'docs browser check failed: {exc}', file=sys.stderr)
        return 1
    finally:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
