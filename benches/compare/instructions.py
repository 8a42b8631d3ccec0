#!/usr/bin/env python3
"""Instructions per request under callgrind: cmux-edge and the pingora floor (issue 15).

The side-by-side harness moves by ±10% between runs on a shared VM; instruction counts do
not. Each proxy runs whole under `valgrind --tool=callgrind` in front of the bench backend;
h2load sends a warm-up, the counters are zeroed (`callgrind_control -z`), h2load sends the
measured requests, the counters are dumped, and the total is divided by the request count.

- `h1`: keep-alive `GET /small` over HTTP/1.1, `h2load --h1 -c32` with one `Host` header,
  like wrk;
- `h2-tls`: the same over TLS with HTTP/2, `h2load -c10 -m10`.

Needs the release binaries (`benches/compare/run` builds them), valgrind and h2load.

usage: instructions.py [--only cmux-edge,floor] [--workloads h1,h2-tls] [--requests N]
                       [--warmup N] [--edge-extra FILE] [--log-level info]
"""

import argparse
import atexit
import glob
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare as c  # noqa: E402  (the harness's configs and process handling)


def totals(outfile):
    """The instruction total of a callgrind dump: its `totals:` (or `summary:`) line, which
    callgrind writes last; None while the dump is still being written."""
    with open(outfile) as f:
        for line in f:
            if line.startswith(("totals:", "summary:")):
                return int(line.split()[1])
    return None


def h2load(url, n, workload, connect_to):
    # The host is the URI's (one `Host`, or `:authority` and SNI); the address `connect_to`.
    argv = ["h2load", "-n", str(n), f"--connect-to={connect_to}"]
    argv += ["--h1", "-c32"] if workload == "h1" else ["-c10", "-m10"]
    r = c.run(argv + [url], timeout=600)
    if f"{n} succeeded" not in r.stdout or "0 failed" not in r.stdout:
        raise c.Broken(f"h2load: not every request succeeded:\n{r.stdout}")


def measure(name, d, ports, cert, key, args, workload):
    out = os.path.join(d, f"callgrind.{name}.{workload}")
    vg = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p"]
    if name == "cmux-edge":
        extra = ""
        if args.edge_extra:
            with open(args.edge_extra) as f:
                extra = "\n" + f.read()
        conf = c.cmux_edge_config(d, ports, extra)
        http_port, tls_port = ports["edge_http"], ports["edge_https"]
        argv = vg + [os.path.join(c.RELEASE, "cmux-edge"), "run", "--config", conf]
        env = {"RUST_LOG": args.log_level}
    else:
        http_port, tls_port = ports["floor_http"], ports["floor_https"]
        argv = vg + [os.path.join(c.RELEASE, "examples", "pingora_floor"),
                     "--http", f"127.0.0.1:{http_port}",
                     "--upstream", f"127.0.0.1:{ports['backend_http']}",
                     "--https", f"127.0.0.1:{tls_port}", "--cert", cert, "--key", key]
        env = {}
    proc = c.spawn(f"{name}-{workload}", argv, d, env=env)
    host = f"port-{ports['backend_http']}-vm-{c.ID}.edge.test"
    t = c.Target(name, http_port, tls_port, proc)
    c.wait_ready(t, host, timeout=120)
    if workload == "h1":
        url, connect_to = f"http://{host}/small", f"127.0.0.1:{http_port}"
    else:
        url, connect_to = f"https://{host}/small", f"127.0.0.1:{tls_port}"
    h2load(url, args.warmup, workload, connect_to)
    c.run(["callgrind_control", "-z", str(proc.pid)], timeout=60)
    h2load(url, args.requests, workload, connect_to)
    before = set(glob.glob(out + ".*"))
    c.run(["callgrind_control", "-d", str(proc.pid)], timeout=60)
    # The process writes the dump itself: wait for the file, then for its last line.
    deadline, n = time.time() + 60, None
    while n is None and time.time() < deadline:
        dumps = set(glob.glob(out + ".*")) - before
        if dumps:
            n = totals(max(dumps, key=os.path.getmtime))
        if n is None:
            time.sleep(0.2)
    if n is None:
        raise c.Broken("callgrind wrote no complete dump within 60 s")
    os.killpg(proc.pid, 9)  # counted already; a graceful shutdown under valgrind takes long
    proc.wait(timeout=30)
    return n / args.requests


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="floor,cmux-edge")
    ap.add_argument("--workloads", default="h1,h2-tls")
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--edge-extra", help="a TOML file appended to cmux-edge's config")
    ap.add_argument("--log-level", default="info",
                    help="cmux-edge's RUST_LOG (info: the access log on, as in the harness)")
    args = ap.parse_args()

    atexit.register(c.cleanup)
    d = tempfile.mkdtemp(prefix="cmux-instructions-")
    ports = {k: c.free_port() for k in [
        "backend_http", "backend_tls", "edge_http", "edge_https", "edge_admin",
        "floor_http", "floor_https"]}
    cert, key = c.make_cert(d)
    backend = c.spawn("backend", [
        os.path.join(c.RELEASE, "examples", "bench_backend"),
        "--http", f"127.0.0.1:{ports['backend_http']}",
        "--tls", f"127.0.0.1:{ports['backend_tls']}", "--cert", cert, "--key", key], d)
    c.wait_ready(c.Target("direct", ports["backend_http"], ports["backend_tls"], backend),
                 f"port-{ports['backend_http']}-vm-{c.ID}.edge.test")

    rows = []
    for workload in args.workloads.split(","):
        for name in args.only.split(","):
            per = measure(name, d, ports, cert, key, args, workload)
            c.log(f"{name} {workload}: {per:,.0f} instructions per request")
            rows.append((workload, name, per))
    print(f"| workload | proxy | instructions per request ({args.requests:,} after {args.warmup:,}) |")
    print("|---|---|---:|")
    for workload, name, per in rows:
        print(f"| {workload} | {name} | {per:,.0f} |")


if __name__ == "__main__":
    try:
        main()
    except c.Broken as e:
        c.log(f"BROKEN: {e}")
        sys.exit(1)
