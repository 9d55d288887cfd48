"""A tiny HTTP server on 127.0.0.1 for download tests (no internet): serves byte strings with
Range support and can misbehave on purpose (short bodies, ignored ranges)."""

from __future__ import annotations

import contextlib
import http.server
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class Served:
    """What the server serves, how it misbehaves, and what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    short_by: int = 0  # send this many bytes fewer than Content-Length says, then close
    ignore_range: bool = False  # answer Range requests with the full file (200)
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range header)
    base_url: str = ""


def _handler(served: Served) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            served.requests.append((self.path, range_header))
            body = served.files.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
            if match and not served.ignore_range:
                start = int(match.group(1))
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            part = body[start:]
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            self.wfile.write(part[: max(0, len(part) - served.short_by)])
            if served.short_by:
                self.close_connection = True

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

    return Handler


@contextlib.contextmanager
def serve(served: Served) -> Iterator[Served]:
    """Run the server in a thread for the duration of the `with` block."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    served.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
