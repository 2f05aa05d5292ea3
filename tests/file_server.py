"""Test helper: a loopback HTTP server that serves the files under a folder with Range support,
as huggingface.co does, and misbehaves on purpose when told to."""
import http.server
import re
import threading
from pathlib import Path


class Request(tuple):
    """One GET as logged: (path, its Range header or None); .get(name) reads any of its headers."""

    def __new__(cls, path, headers):
        req = super().__new__(cls, (path, headers.get("Range")))
        req.get = headers.get
        return req


class FileServer:
    """Serves the files under `root` on 127.0.0.1 from a thread, honouring `Range: bytes=N-` (416
    past the end). url: the server's base URL.

    requests: every GET, in order, as a Request.
    script: how to answer the next GETs, one entry each, before serving normally again: an HTTP
    status (with no body); "truncate" (announce the whole answer, send half of it, hang up);
    ("truncate", K) (the same after K bytes); "ignore-range" (the whole file with 200, as some
    servers do); "wrong-range" (206 from byte 0 whatever was asked); "corrupt" (byte 10 flipped).
    """

    def __init__(self, root):
        self.root, self.requests, self.script = Path(root), [], []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(Request(self.path, self.headers))
                action = server.script.pop(0) if server.script else "ok"
                f = server.root / self.path.lstrip("/")
                if ".." in self.path or not f.is_file():
                    action = 404
                if isinstance(action, int):
                    return self.reply(action, {"Content-Length": "0"})
                data = f.read_bytes()
                if action == "corrupt":
                    data = data[:10] + bytes([data[10] ^ 1]) + data[11:]
                m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                ranged = m is not None and action != "ignore-range"
                start = int(m[1]) if ranged and action != "wrong-range" else 0
                if ranged and start >= len(data):
                    return self.reply(416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"})
                length = {"Content-Length": str(len(data) - start)}
                if ranged:
                    self.reply(206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}", **length})
                else:
                    self.reply(200, length)
                body = data[start:]
                if action == "truncate":
                    body = body[:len(body) // 2]
                elif isinstance(action, tuple):  # ("truncate", K)
                    body = body[:action[1]]
                self.wfile.write(body)  # HTTP/1.0: the connection closes after each answer

            def reply(self, status, headers):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
