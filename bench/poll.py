"""Poll throughput of one hub process over mutual TLS, against nginx on the same machine.

Not a test: it prints figures, and ratios to nginx measured in the same run
with the same load generator, and never fails on a slow result. Usage:

    python bench/poll.py [--devices 100000] [--concurrency 200] [--seconds 8]
                         [--db sqlite,postgresql] [--quick] [--no-profile]
    make bench-poll BENCH_ARGS=--quick

What runs, all on 127.0.0.1:

- a hub per database (``init_hub``), with ``--devices`` device rows inserted
  in bulk; ``--concurrency`` of them, spread among the others, are real: they
  have certificates from the hub's device CA whose fingerprints are in their
  rows, as enrollment leaves them, and a director repository;
- that hub's device gateway in a child process, built by
  ``skylift.hub.server.gateway_server`` as ``skylift hub serve`` builds it;
- nginx (installed when missing) with one worker by default, mutual TLS with
  the same device CA and a server certificate issued the same way, serving a
  small static file at the same path; the client's ``If-None-Match`` makes it
  answer ``304`` too, as the hub does;
- ``bench/loadgen.c`` (C, OpenSSL, epoll; compiled here with gcc), one
  connection per simulated device, each device sending the ETag it was last
  given: (a) ``keepalive``, polls one after another on one connection;
  (b) ``reconnect``, a new TCP and TLS connection per poll resuming the
  device's last session ticket, with ``Connection: close``.

The first poll of every device (a ``200``) and its full handshake happen in a
warm-up second that is not counted. Then py-spy (installed into this
interpreter's environment when missing) samples the hub under each load.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

_REPO = Path(__file__).resolve().parent.parent
_LOADGEN_C = _REPO / "bench" / "loadgen.c"
_POLL_PATH = "/device/v1/poll"
_LOADS = ("keepalive", "reconnect", "full")
_LOAD_NAMES = {
    "keepalive": "(a) keep-alive",
    "reconnect": "(b) new conn+resume",
    "full": "new conn, full hs",
}
_AIM = {"keepalive": 8000.0, "reconnect": 1200.0}
# After every simulated device made its first poll (see bench/loadgen.c).
_WARMUP_S = 1.0
_MAX_WARMUP_S = 60.0
_NGINX_BODY = b'{"etag":"0123456789abcdef01234567","poll_interval_s":300,"update":null}'
_START_TIMEOUT_S = 60.0
_INSERT_BATCH = 10_000
_PROFILE_RATE_HZ = 200
_TOP = 15


@dataclass
class Result:
    target: str
    load: str
    doc: dict[str, float | int | str]

    @property
    def rps(self) -> float:
        return float(self.doc["rps"])


# --------------------------------------------------------------------------- tools


def _ensure_debs(*packages: str) -> None:
    subprocess.run([str(_REPO / "scripts" / "ensure-debs"), *packages], check=True)


def _nginx() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found is None:
        _ensure_debs("nginx")
        found = "/usr/sbin/nginx"
    return found


def _build_loadgen() -> Path:
    """bench/loadgen.c compiled once per source version into the user's cache."""
    source = _LOADGEN_C.read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "skylift-bench"
    binary = cache / f"loadgen-{hashlib.sha256(source).hexdigest()[:12]}"
    if binary.exists():
        return binary
    if shutil.which("gcc") is None or not Path("/usr/include/openssl/ssl.h").exists():
        _ensure_debs("gcc", "libc6-dev", "libssl-dev")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(tmp), str(_LOADGEN_C), "-lssl", "-lcrypto"], check=True
    )
    tmp.replace(binary)
    return binary


def _py_spy() -> str | None:
    """py-spy next to this interpreter, installed with pip when missing; None if impossible."""
    exe = Path(sys.executable).parent / "py-spy"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=False)
    return str(exe) if exe.exists() else shutil.which("py-spy")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} during startup")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on {port} within {_START_TIMEOUT_S:.0f} s")


@contextlib.contextmanager
def _child(args: list[str], port: int, what: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, proc, what)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- the fleet


@dataclass(frozen=True)
class Fleet:
    """A hub directory with its database filled, and the simulated devices' files."""

    hub_dir: Path
    database_url: str
    ca_pem: Path
    cert_dir: Path
    simulated: int


def _make_fleet(base: Path, database_url: str | None, *, devices: int, simulated: int) -> Fleet:
    from sqlalchemy import Table, insert, select
    from sqlalchemy.orm import Session

    from skylift.hub import ca
    from skylift.hub.db.models import (
        Device,
        DeviceState,
        EnrollmentMethod,
        Organisation,
        Product,
    )
    from skylift.hub.setup import init_hub, open_hub

    now = datetime.now(UTC)
    result = init_hub(
        base / "hub", organisation="bench", admin_email="ops@bench.example",
        database_url=database_url, gateway_port=0, api_port=0, now=now - timedelta(days=1),
    )  # fmt: skip
    ctx = open_hub(result.config)
    with ctx.transaction() as session:
        org_id = session.scalars(select(Organisation.id)).one()
        product = Product(org_id=org_id, name="bench-product")
        session.add(product)
        session.flush()
        product_id = product.id
    cert_dir = base / "devices"
    cert_dir.mkdir()
    # The simulated devices sit among the others, not at one end of the table.
    stride = max(1, devices // simulated)
    real = {i * stride: n for n, i in enumerate(range(simulated))}
    not_after = now + timedelta(days=3650)
    rows = []
    for i in range(devices):
        device_id = f"bench-{i:07d}"
        fingerprint = secrets.token_hex(32)
        n = real.get(i)
        if n is not None:
            key = ca.generate_device_key()
            cert_pem = ca.issue_device_cert(
                ctx.device_ca_pem, ctx.device_ca_key_pem, ca.make_csr(key, device_id),
                device_id=device_id, now=now - timedelta(hours=1), valid_for=timedelta(days=30),
            )  # fmt: skip
            (cert_dir / f"dev-{n}.pem").write_bytes(cert_pem)
            (cert_dir / f"dev-{n}.key").write_bytes(ca.private_key_pem(key))
            fingerprint = ca.fingerprint(ssl_der(cert_pem))
            ctx.director.ensure(device_id)
        rows.append(
            {
                "device_id": device_id, "org_id": org_id, "product_id": product_id,
                "hardware_id": "hw1", "cert_fingerprint": fingerprint,
                "cert_not_after": not_after, "enrolled_via": EnrollmentMethod.PROVISIONING,
                "revoked": False, "state": DeviceState.IDLE,
            }
        )  # fmt: skip
    table = cast(Table, Device.__table__)
    with Session(ctx.sessions.kw["bind"]) as session, session.begin():
        for start in range(0, len(rows), _INSERT_BATCH):
            session.execute(insert(table), rows[start : start + _INSERT_BATCH])
    ctx.sessions.kw["bind"].dispose()
    return Fleet(
        hub_dir=base / "hub",
        database_url=result.config.database_url,
        ca_pem=result.config.ca_dir / "device-ca.pem",
        cert_dir=cert_dir,
        simulated=simulated,
    )


def ssl_der(pem: bytes) -> bytes:
    import ssl

    return ssl.PEM_cert_to_DER_cert(pem.decode("ascii"))


# --------------------------------------------------------------------------- servers


def _serve_hub_child(hub_dir: str, database_url: str, port: int) -> None:
    """The child process: the hub's device gateway alone, as ``skylift hub serve`` runs it."""
    import logging
    from dataclasses import replace

    from skylift.hub.config import ListenConfig, load_config
    from skylift.hub.server import gateway_server, run_server
    from skylift.hub.setup import open_hub

    # As the CLI does: whatever logging costs per request is in the figures.
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(Path(hub_dir)).with_overrides(database_url=database_url, storage_url=None)
    config = replace(config, gateway=ListenConfig("127.0.0.1", port))
    ctx = open_hub(config)
    run_server(gateway_server(ctx))


@contextlib.contextmanager
def _hub(fleet: Fleet, base: Path) -> Iterator[tuple[int, int]]:
    port = _free_port()
    args = [sys.executable, str(Path(__file__).resolve()), "--serve-hub",
            str(fleet.hub_dir), fleet.database_url, str(port)]  # fmt: skip
    with _child(args, port, "the hub", base / "hub.log") as proc:
        yield port, proc.pid


@contextlib.contextmanager
def _nginx_server(fleet: Fleet, base: Path, workers: int) -> Iterator[tuple[int, int]]:
    """nginx with mutual TLS against the fleet's device CA, serving a small poll answer."""
    root = base / "nginx"
    docroot = root / "www" / "device" / "v1"
    docroot.mkdir(parents=True)
    for sub in ("logs", "tmp"):
        (root / sub).mkdir()
    # The same small JSON a hub sends with a 200; the client's If-None-Match gets a 304.
    (docroot / "poll").write_bytes(_NGINX_BODY)
    hub_ca = fleet.hub_dir / "ca"
    port = _free_port()
    conf = root / "nginx.conf"
    conf.write_text(f"""\
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {hub_ca}/server.pem;
        ssl_certificate_key {hub_ca}/server.key;
        ssl_client_certificate {hub_ca}/device-ca.pem;
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:10m;
        ssl_session_timeout 2h;
        ssl_session_tickets on;
        root {root}/www;
        location = {_POLL_PATH} {{ default_type application/json; etag on; }}
    }}
}}
""")
    # Workers run as nobody when started as root: they must reach the file.
    for path in (base, root, root / "www", docroot.parent.parent, docroot.parent, docroot):
        path.chmod(0o755)
    (docroot / "poll").chmod(0o644)
    args = [_nginx(), "-p", str(root), "-c", str(conf), "-e", f"{root}/logs/error.log",
            "-g", "daemon off;"]  # fmt: skip
    with _child(args, port, "nginx", base / "nginx.log") as proc:
        yield port, proc.pid


# --------------------------------------------------------------------------- load and profile


def _load(
    loadgen: Path, port: int, load: str, fleet: Fleet, args: argparse.Namespace
) -> dict[str, Any]:
    cmd = [str(loadgen), "127.0.0.1", str(port), _POLL_PATH, load, str(args.concurrency),
           str(args.seconds), str(_WARMUP_S), str(fleet.ca_pem), str(fleet.cert_dir),
           str(fleet.simulated)]  # fmt: skip
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.seconds + _MAX_WARMUP_S + 60, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"loadgen failed: {out.stderr.strip()[-500:]}")
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def _profile(
    py_spy: str, pid: int, loadgen: Path, port: int, load: str, fleet: Fleet,
    args: argparse.Namespace, out: Path,
) -> Path | None:  # fmt: skip
    """Run ``load`` again while py-spy samples the hub; the raw (collapsed) stacks."""
    seconds = max(2, int(args.seconds))
    spy = subprocess.Popen(
        [py_spy, "record", "--pid", str(pid), "--rate", str(_PROFILE_RATE_HZ), "--nonblocking",
         "--format", "raw", "--duration", str(seconds), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    _load(loadgen, port, load, fleet, argparse.Namespace(**{**vars(args), "seconds": seconds}))
    try:
        _, err = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        return None
    if spy.returncode != 0 or not out.exists():
        print(f"py-spy failed: {err.decode(errors='replace').strip()[-300:]}", file=sys.stderr)
        return None
    return out


def _frame_name(frame: str) -> str:
    # py-spy's raw frames read "function (path/to/module.py:line)".
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/src/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})" if path else name


def _area(frame: str) -> str:
    checks = (
        ("sslproto", "TLS (ssl module, OpenSSL)"),
        ("ssl.py", "TLS (ssl module, OpenSSL)"),
        # Runner.run's own time is the loop's compiled code under uvloop:
        # socket calls and moving TLS records, which have no Python frames.
        ("runners.py", "event loop (uvloop: sockets, TLS records)"),
        ("h11", "HTTP parsing (h11)"),
        ("httptools", "HTTP parsing (httptools)"),
        ("uvicorn", "uvicorn protocol"),
        ("starlette", "Starlette (routing, middleware, responses)"),
        ("skylift/hub/tls", "skylift.hub.tls (TLS extension)"),
        ("skylift/hub/gateway", "skylift gateway (identity, poll)"),
        ("skylift/hub/web", "skylift.hub.web"),
        ("sqlalchemy", "database"),
        ("logging", "logging"),
        ("asyncio", "asyncio event loop"),
        ("uvloop", "uvloop event loop"),
    )
    for needle, area in checks:
        if needle in frame:
            return area
    return "other"


def _summarise(raw: Path, title: str) -> list[str]:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    areas: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        names = [_frame_name(f) for f in frames]
        self_time[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
        # The innermost frame that is not the event loop's own machinery names the area.
        area = next((a for a in (_area(f) for f in reversed(frames)) if a != "other"), "other")
        if "select (selectors.py" in frames[-1]:
            area = "idle (waiting in select)"
        areas[area] += count
    if not total:
        return [f"{title}: no samples"]
    lines = [f"{title}: {total} samples, all threads"]
    lines.append("  where the time goes (innermost recognised frame):")
    lines += [f"    {100 * n / total:5.1f}%  {a}" for a, n in areas.most_common()]
    lines.append(f"  top {_TOP} by own time:")
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in self_time.most_common(_TOP)]
    lines.append(f"  top {_TOP} inclusive (skylift, starlette, uvicorn, TLS):")
    interesting = [
        (f, n) for f, n in inclusive.most_common()
        if any(k in f for k in ("skylift/", "starlette/", "uvicorn/", "sslproto", "ssl.py", "h11"))
    ]  # fmt: skip
    lines += [f"    {100 * n / total:5.1f}%  {f}" for f, n in interesting[:_TOP]]
    return lines


# --------------------------------------------------------------------------- report


def _ms(us: float | int | str) -> str:
    return f"{float(us) / 1000:.2f}"


def _table(results: list[Result]) -> list[str]:
    nginx = {r.load: r.rps for r in results if r.target == "nginx"}
    head = (
        f"{'target':<16} {'load':<22} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'resumed':>8} {'non-304':>8} {'errors':>7} {'vs nginx':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        d = r.doc
        handshakes = int(d["handshakes"])
        resumed = f"{100 * int(d['resumed']) / handshakes:.0f}%" if handshakes else "-"
        non_304 = int(d["requests"]) - int(d["status_304"])
        ratio = f"{r.rps / nginx[r.load]:.3f}" if nginx.get(r.load) else "-"
        lines.append(
            f"{r.target:<16} {_LOAD_NAMES[r.load]:<22} {r.rps:>9.0f} {_ms(d['p50_us']):>8} "
            f"{_ms(d['p99_us']):>8} {resumed:>8} {non_304:>8} {int(d['errors']):>7} {ratio:>9}"
        )
    return lines


def _aims(results: list[Result]) -> list[str]:
    lines = []
    for r in results:
        if r.target.startswith("hub"):
            aim = _AIM[r.load]
            verdict = "meets" if r.rps >= aim else "MISSES"
            lines.append(
                f"{r.target} {_LOAD_NAMES[r.load]}: {r.rps:.0f}/s {verdict} the aim of {aim:.0f}/s"
            )
    return lines


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    if not any(Path("/").glob("usr/lib/postgresql/*/bin/initdb")):
        _ensure_debs("postgresql")
    # The test suite's throwaway server: a private unix socket, no fsync.
    sys.path.insert(0, str(_REPO))
    from tests.hub.conftest import _throwaway_postgres

    with _throwaway_postgres() as url:
        yield url


def _machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cores ({cpu}), Python {sys.version.split()[0]}"


def _run(args: argparse.Namespace, databases: list[str], loads: list[str]) -> None:
    loadgen = _build_loadgen()
    _nginx()
    py_spy = None if args.no_profile else _py_spy()
    results: list[Result] = []
    profiles: list[str] = []
    print(
        f"poll bench: {args.devices} devices, {args.concurrency} concurrent, "
        f"{args.seconds:g} s per load after {_WARMUP_S:g} s warm-up; {_machine()}"
    )
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="skylift-poll-")))
        fleets: dict[str, Fleet] = {}
        for db in databases:
            url = stack.enter_context(_postgres()) if db == "postgresql" else None
            started = time.monotonic()
            fleets[db] = _make_fleet(
                base / db, url, devices=args.devices, simulated=args.concurrency
            )
            took = time.monotonic() - started
            print(f"  {db}: hub with {args.devices} devices made in {took:.1f} s")
        first = fleets[databases[0]]
        with _nginx_server(first, base, args.nginx_workers) as (port, _pid):
            for load in loads:
                results.append(Result("nginx", load, _load(loadgen, port, load, first, args)))
        for db, fleet in fleets.items():
            with _hub(fleet, base / db) as (port, pid):
                for load in loads:
                    doc = _load(loadgen, port, load, fleet, args)
                    results.append(Result(f"hub-{db}", load, doc))
                if py_spy is None or db != databases[0]:
                    continue
                for load in loads:
                    out = base / f"profile-{load}.txt"
                    raw = _profile(py_spy, pid, loadgen, port, load, fleet, args, out)
                    if raw is not None:
                        profiles += [*_summarise(raw, f"hub-{db} {_LOAD_NAMES[load]}"), ""]
    print()
    print(
        f"nginx: {args.nginx_workers} worker process(es), static file, 304 via If-None-Match; "
        "hub: one process"
    )
    print("\n".join(_table(results)))
    print()
    print("\n".join(_aims(results)))
    for r in results:
        if r.doc.get("first_error") or r.doc.get("all_warm") is False:
            print(f"{r.target} {r.load}: all warm: {r.doc['all_warm']}; "
                  f"first error: {r.doc['first_error'] or '-'}")  # fmt: skip
    if profiles:
        print()
        print("profile (py-spy, hub process, during a separate run of each load):")
        print("\n".join(profiles))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100_000, help="device rows (100000)")
    parser.add_argument("--concurrency", type=int, default=200, help="simulated devices (200)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per load, after warm-up (8)")
    parser.add_argument("--db", default="sqlite,postgresql", help="sqlite,postgresql")
    parser.add_argument(
        "--loads",
        default="keepalive,reconnect",
        help="keepalive,reconnect (the issue's (a) and (b)); full: no resumption",
    )
    parser.add_argument("--nginx-workers", type=int, default=1, help="nginx worker processes (1)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2000 devices, 2 s")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--serve-hub", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # This checkout's code, in the hub's child process too, whatever is installed.
    sys.path.insert(0, str(_REPO / "src"))
    if args.serve_hub:
        _serve_hub_child(args.serve_hub[0], args.serve_hub[1], int(args.serve_hub[2]))
        return
    if args.quick:
        args.devices, args.seconds = min(args.devices, 2000), min(args.seconds, 2.0)
    databases = [d.strip() for d in args.db.split(",") if d.strip()]
    if not databases or set(databases) - {"sqlite", "postgresql"}:
        parser.error("--db: sqlite and/or postgresql")
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    if not loads or set(loads) - set(_LOADS):
        parser.error(f"--loads: some of {', '.join(_LOADS)}")
    if args.concurrency < 1 or args.devices < args.concurrency:
        parser.error("--devices must be at least --concurrency, which must be at least 1")
    _run(args, databases, loads)


if __name__ == "__main__":
    main()
