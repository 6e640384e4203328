"""`bsmamba2-serve`: separation from a web page and over HTTP, one model loaded once.

    bsmamba2-serve --checkpoint MODEL [--host 127.0.0.1] [--port 8000] [--max-upload-mb 512]
        [--ttl-minutes 60] [--format wav|flac|wav16|wav24] [the model flags of bsmamba2-separate]

Binds first (a port in use is an error before the model loads), then loads and compiles the
model as `bsmamba2-separate` does, prints "serving on http://HOST:PORT/" and serves until Ctrl+C
or SIGTERM, when every job and its files are removed. --port 0 takes any free port.
Exit status: 0 after a clean stop, 2 bad arguments, no model, or the port cannot be had.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence

from bsmamba2_jax import separate_cli

# 20 minutes of 48 kHz stereo 32-bit float WAV (461 MB), the largest common kind, fits.
DEFAULT_MAX_UPLOAD_MB = 512
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bsmamba2-serve",
        description="Serve a page and an HTTP API that split songs into vocals and "
                    "accompaniment with a BSMamba2 model, one job at a time.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; any "
                             "other lets everyone who reaches it use the model, unauthenticated)")
    parser.add_argument("--port", type=int, default=8000,
                        help="TCP port (default 8000; 0 = any free port, printed at start)")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help="largest upload in MiB (default %(default)s: 20 minutes of 48 kHz "
                             "stereo float WAV)")
    parser.add_argument("--ttl-minutes", type=float, default=60.0,
                        help="minutes a finished job and its files are kept (default "
                             "%(default)s); all are removed when the server stops")
    separate_cli.add_separation_arguments(parser)
    return parser


def listen(host: str, port: int) -> tuple[socket.socket, bool]:
    """A listening socket on host:port and whether it is loopback only. Raises OSError."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock, ipaddress.ip_address(address[0]).is_loopback


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    separate_cli.check_model_argument(parser, args)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} must be in 0..65535 (0 = any free port)")
    for flag, value in (("--max-upload-mb", args.max_upload_mb),
                        ("--ttl-minutes", args.ttl_minutes)):
        if not (math.isfinite(value) and value > 0):
            parser.error(f"{flag} {value:g} must be a positive number")
    try:
        import uvicorn

        from bsmamba2_jax.serve.app import build_app
        from bsmamba2_jax.serve.jobs import JobQueue
    except ImportError as e:
        print(f"error: bsmamba2-serve needs the web extra ({e}): pip install -e '.[serve]'",
              file=sys.stderr)
        return 2
    try:
        sock, loopback = listen(args.host, args.port)
    except OSError as e:
        parser.error(f"--host {args.host} --port {args.port}: cannot listen there ({e}); "
                     "choose another port, or --port 0 for any free one")
    if not loopback:
        print(f"warning: listening on {args.host}, reachable from other machines: anyone who "
              "can reach it can upload files and run the model, with no password; use --host "
              "127.0.0.1 (the default) unless that is what you want", file=sys.stderr)
    try:
        separator = separate_cli.separator_from_args(args)
    except (ValueError, FileNotFoundError) as e:
        sock.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model: {separator.description}", file=sys.stderr)
    root = tempfile.mkdtemp(prefix="bsmamba2-serve-")
    jobs = JobQueue(separator, root, ttl=60 * args.ttl_minutes, nonfinite=args.nonfinite)
    max_upload = int(args.max_upload_mb * 2**20)
    app = build_app(jobs, description=separator.description, max_upload=max_upload,
                    default_format=args.format,
                    allowed_hosts=LOOPBACK_NAMES if loopback else None)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    config = uvicorn.Config(app, log_level="warning", access_log=False, ws="none",
                            timeout_graceful_shutdown=5)
    print(f"serving on http://{shown}:{port}/ (jobs in {root}, removed on exit; Ctrl+C stops)",
          flush=True)
    # uvicorn stops gracefully on SIGINT or SIGTERM, then raises the signal again: both end up
    # as KeyboardInterrupt here, a clean stop.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        jobs.close()
        sock.close()
    print("stopped; every job and its files removed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
