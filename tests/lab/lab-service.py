#!/usr/bin/python3
"""The lab host's HTTP service: reports which system runs, or fails on purpose.

It stands in for a web service a NixOS configuration would run, so health
checks and "what runs where" have something real to ask.
"""
import json
import os
import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

system = sys.argv[1]
with open(os.path.join(system, "etc/lab/service.json")) as f:
    config = json.load(f)
with open("/etc/lab/host.json") as f:
    host = json.load(f)



def notify(message: str) -> None:
    """Tell systemd (Type=notify units on systemd lab hosts) how the service is doing."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(message.encode())


if config.get("down"):
    # The "service does not answer" fault: exit without listening (started
    # fine, as far as systemd is concerned).
    notify("READY=1")
    sys.exit(0)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps(
            {
                "host": host["name"],
                "version": config["version"],
                "system": system,
            }
        ).encode() + b"\n"
        self.send_response(int(config.get("status", 200)))
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class Server(HTTPServer):
    address_family = socket.AF_INET
    allow_reuse_address = True


server = Server((host["address"], int(host["httpPort"])), Handler)
with open("/run/lab/service.ready", "w") as f:
    f.write(str(os.getpid()))
notify("READY=1")
server.serve_forever()
