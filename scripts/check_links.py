"""Check every internal link and image of the built docs site: ``python scripts/check_links.py [SITE]``.

Serves SITE (default ``site/``, from ``mkdocs build --strict``) on a loopback port and runs
linkchecker on it over HTTP. Not on ``file://`` paths: linkchecker run as root changes its user
to ``nobody``, which cannot read a checkout under a private directory (``mktemp -d`` is 0700)
and reports every page as an error. Exit status: linkchecker's (0 when nothing is broken).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def serve(site: str) -> Iterator[str]:
    """Serve the folder ``site`` on 127.0.0.1 (a free port) in a thread; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def end_headers(self):
            # linkchecker lifts its 10-requests-a-second limit for servers that send this header.
            self.send_header("LinkChecker", "local")
            super().end_headers()

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            # A checker that closes a connection once it has the headers is not a problem.
            if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=site))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def linkchecker_command() -> list[str] | None:
    """linkchecker next to this interpreter (a venv's bin folder), else the one on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "linkchecker")
    if os.path.isfile(beside):
        return [beside]
    found = shutil.which("linkchecker")
    return [found] if found else None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    site = argv[0] if argv else "site"
    if not os.path.isfile(os.path.join(site, "index.html")):
        print(f"check_links: {site}/index.html not found: run mkdocs build --strict first", file=sys.stderr)
        return 2
    command = linkchecker_command()
    if command is None:
        print('check_links: linkchecker not found: pip install -e ".[docs]"', file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp, serve(site) as base:
        config = os.path.join(tmp, "linkcheckerrc")
        with open(config, "w") as f:
            f.write("[checking]\nmaxrequestspersecond=1000\n")
        os.chmod(tmp, 0o755)  # linkchecker run as root reads it as nobody
        return subprocess.run(command + ["--config", config, "--no-status", "--no-warnings",
                                         base + "index.html"]).returncode


if __name__ == "__main__":
    raise SystemExit(main())
