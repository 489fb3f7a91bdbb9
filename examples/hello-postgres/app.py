"""A visit counter kept in the app's postgres resource: rack links `database` to `web`, so the
process gets DATABASE_URL (and DATABASE_HOST, _PORT, _USER, _PASS, _NAME). Python's standard
library has no Postgres client, so it asks `psql`, which the rack's host has."""

import http.server
import os
import subprocess


def sql(query):
    out = subprocess.run(
        ["psql", os.environ["DATABASE_URL"], "-qtA", "-v", "ON_ERROR_STOP=1", "-c", query],
        capture_output=True, text=True, check=True,
    )
    return out.stdout.strip()


# The table is made at start; it survives every later deployment and rollback.
sql("create table if not exists visits (at timestamptz not null default now())")


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            body = b"ok\n"
        else:
            count = sql("insert into visits default values; select count(*) from visits")
            body = f"Hello from rack! visit {count}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        print(f"{self.command} {self.path}", flush=True)


http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
