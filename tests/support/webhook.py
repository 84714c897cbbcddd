"""A real webhook endpoint for alert tests: a local HTTP server that records every POST."""

import http.server
import json
import threading

from indexer_dagster.devnet.anvil import free_port

TOKEN = "WEBHOOKTOKEN999"  # in the URL like a real hook's secret: it must never be logged


class Receiver:
    """A webhook endpoint: records every POST; the first `fail_first` get `fail_status`."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503) -> None:
        self.attempts: list[dict] = []
        self.fail_first, self.fail_status = fail_first, fail_status
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                receiver.attempts.append({"path": self.path, "body": body})
                failing = len(receiver.attempts) <= receiver.fail_first
                self.send_response(receiver.fail_status if failing else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}/hooks/{TOKEN}"

    @property
    def alerts(self) -> list[dict]:
        n = self.fail_first
        return [a["body"] for a in self.attempts[n:]]

    def kinds(self) -> list[str]:
        return [a["kind"] for a in self.alerts]
