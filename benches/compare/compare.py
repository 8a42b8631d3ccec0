#!/usr/bin/env python3
"""Side-by-side benchmark: direct vs the pingora floor vs cmux-edge vs nginx vs Caddy on loopback (issues 7, 15).

Started by `benches/compare/run`, which installs the tools and builds the binaries first.
Everything it starts runs in its own process group and is killed on exit; every config goes
into a fresh temp dir. See benches/README.md for the workloads and the fairness rules.

usage: compare.py [--quick] [--out FILE] [--rounds N] [--secs S] [--only T,T] [--workloads W,W]
"""

import argparse
import atexit
import contextlib
import datetime
import http.client
import json
import os
import platform
import re
import resource
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RELEASE = os.path.join(ROOT, "target", "release")
TARGETS = ["direct", "floor", "cmux-edge", "nginx", "caddy"]
PROXIES = TARGETS[1:]
ID = "bench"
SMALL_BODY = b"hello from the bench backend :)\n"

STARTED = []  # process groups we started, killed at exit


class Broken(Exception):
    """Something is actually broken (a proxy did not start, a wrong status): CI fails."""


def log(msg):
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes and /proc


def cleanup():
    for p in reversed(STARTED):
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 3
    for p in STARTED:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def on_signal(signum, _frame):
    cleanup()
    sys.exit(128 + signum)


def pin(core):
    return ["taskset", "-c", str(core)] if core is not None else []


def spawn(name, argv, workdir, env=None):
    """Starts a long-running server in its own process group, output to a log file."""
    out = open(os.path.join(workdir, f"{name}.log"), "wb")
    p = subprocess.Popen(
        argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=workdir,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    STARTED.append(p)
    return p


def group_pids(pgid):
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat: pgrp
            pids.append(int(d))
    return pids


def group_cpu_ticks(pgid):
    total = 0
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total


def group_rss_kib(pgid):
    total = 0
    for pid in group_pids(pgid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(argv, timeout, check=True):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise Broken(f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
    return r


def tool_version(argv):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        out = (r.stdout + r.stderr).strip().splitlines()
        return out[0].strip() if out else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"


# ---------------------------------------------------------------- configs


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


KEY_ARGS = {
    "p256": ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
    "rsa2048": ["-newkey", "rsa:2048"],
}
KEY_NAMES = {"p256": "ECDSA P-256", "rsa2048": "RSA-2048"}


def make_cert(d, key="p256"):
    certs = os.path.join(d, "certs")
    os.makedirs(certs)
    run(
        [
            "openssl", "req", "-x509", *KEY_ARGS[key],
            "-nodes", "-days", "7", "-subj", "/CN=*.edge.test",
            "-addext", "subjectAltName=DNS:*.edge.test,DNS:edge.test",
            "-keyout", os.path.join(certs, "edge.key"), "-out", os.path.join(certs, "edge.crt"),
        ],
        timeout=30,
    )
    return os.path.join(certs, "edge.crt"), os.path.join(certs, "edge.key")


def cmux_edge_config(d, p, extra=""):
    path = os.path.join(d, "cmux-edge.toml")
    write(path, f"""# cmux-edge under test: one worker thread, the built-in (safe) policy defaults.
[server]
threads = 1
shutdown_grace = "1s"

[listen]
http = "127.0.0.1:{p['edge_http']}"
https = "127.0.0.1:{p['edge_https']}"
admin = "127.0.0.1:{p['edge_admin']}"

[[domains]]
name = "edge.test"

[[routes]]
pattern = "port-{{port}}-vm-{{id}}"

[registry]
source = "static"

[[registry.vms]]
id = "{ID}"
address = "127.0.0.1"

[upstreams]
allow_loopback = true

[admin]
state_file = "{d}/cmux-edge-state.json"

[tls]
certs_dir = "{d}/certs"

[timeouts]
connect = "10s"
read = "300s"
write = "60s"
idle = "60s"
websocket_idle = "1h"
""" + extra)
    return path


def nginx_config(d, p, cert, key, nofile):
    os.makedirs(os.path.join(d, "nginx-tmp"))
    path = os.path.join(d, "nginx.conf")
    b = p["backend_http"]
    write(path, f"""# nginx as its users would set it up for preview hosts: one regex server_name, a static
# map from (vm, port) to an upstream with a keepalive pool, WebSocket headers, the cmux headers.
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;

events {{
    worker_connections {min(32768, nofile)};
}}

http {{
    access_log {d}/nginx-access.log;
    client_body_temp_path {d}/nginx-tmp/body;
    proxy_temp_path {d}/nginx-tmp/proxy;
    fastcgi_temp_path {d}/nginx-tmp/fastcgi;
    uwsgi_temp_path {d}/nginx-tmp/uwsgi;
    scgi_temp_path {d}/nginx-tmp/scgi;

    sendfile on;
    tcp_nodelay on;
    # Same client keep-alive as the others (nginx's default closes after 1000 requests).
    keepalive_timeout 60s;
    keepalive_requests 1000000;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {cert};
    ssl_certificate_key {key};

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}

    upstream vm_{ID}_{b} {{
        server 127.0.0.1:{b};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}

    # The registry: "<id>:<port>" -> upstream. Unknown -> "" -> 404.
    map "$id:$port" $vm_upstream {{
        default "";
        "{ID}:{b}" vm_{ID}_{b};
    }}

    server {{
        listen 127.0.0.1:{p['nginx_http']} default_server;
        listen 127.0.0.1:{p['nginx_https']} ssl http2 default_server;
        return 421 "misdirected request\\n";
    }}

    server {{
        listen 127.0.0.1:{p['nginx_http']};
        listen 127.0.0.1:{p['nginx_https']} ssl http2;
        server_name ~^port-(?<port>\\d+)-vm-(?<id>[a-z0-9-]+)\\.edge\\.test$;

        if ($http_x_cmux_proxied ~* "^true$") {{
            return 508 "Loop detected in proxy\\n";
        }}
        if ($vm_upstream = "") {{
            return 404 "unknown vm $id\\n";
        }}

        location / {{
            proxy_pass http://$vm_upstream;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Cmux-Proxied true;
            proxy_set_header X-Cmux-Port-Internal $port;
            proxy_set_header X-Cmux-Vm-Id $id;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Request-Id $request_id;
            proxy_hide_header Content-Security-Policy;
            proxy_hide_header Content-Security-Policy-Report-Only;
            proxy_hide_header X-Frame-Options;
            proxy_hide_header Cross-Origin-Embedder-Policy;
            proxy_hide_header Cross-Origin-Opener-Policy;
            proxy_hide_header Cross-Origin-Resource-Policy;
            proxy_connect_timeout 10s;
            proxy_read_timeout 300s;
            proxy_send_timeout 60s;
        }}
    }}
}}
""")
    return path


def caddy_config(d, p, cert, key):
    path = os.path.join(d, "Caddyfile")
    write(path, f"""# Caddy as in the Proxmox tunnel setup (scripts/pve/pve-tunnel-setup.sh, reference item 20):
# header_regexp on Host, reverse_proxy to the port from the host, the same header edits.
# The DNS "registry" ({{re.service.2}}.lan) is replaced by the VM's fixed address here,
# as the other proxies use a static address too.
{{
	admin off
	auto_https off
	servers {{
		protocols h1 h2
		timeouts {{
			idle 60s
		}}
	}}
}}

(preview) {{
	log {{
		output file {d}/caddy-access.log
	}}

	@preview header_regexp service Host ^port-(\\d+)-([a-z0-9-]+)\\.
	handle @preview {{
		@options method OPTIONS
		handle @options {{
			header Access-Control-Allow-Origin *
			header Access-Control-Allow-Methods "GET, POST, PUT, DELETE, PATCH, OPTIONS, HEAD"
			header Access-Control-Allow-Headers *
			header Access-Control-Max-Age 86400
			respond 204
		}}
		reverse_proxy 127.0.0.1:{{re.service.1}} {{
			header_up Host {{upstream_hostport}}
			header_up X-Forwarded-Proto https
			header_up X-Forwarded-Host {{host}}
			header_down -X-Frame-Options
			header_down -Content-Security-Policy
			header_down -Content-Security-Policy-Report-Only
			header_down -Cross-Origin-Embedder-Policy
			header_down -Cross-Origin-Opener-Policy
			header_down -Cross-Origin-Resource-Policy
			header_down -Access-Control-Allow-Origin
			header_down -Access-Control-Allow-Methods
			header_down -Access-Control-Allow-Headers
			header_down -Access-Control-Allow-Credentials
			header_down -Access-Control-Expose-Headers
			transport http {{
				dial_timeout 10s
				keepalive 60s
				# An idle pool like nginx's `keepalive 64`. Without these two lines Caddy 2.6.2
				# re-dialled the backend under wrk -c50: 10,923 sockets in TIME_WAIT during one
				# 4 s round and 3,290 req/s; with them 40 and 5,370-6,128 req/s (2026-12-02).
				keepalive_idle_conns 64
				keepalive_idle_conns_per_host 64
			}}
		}}
		header Access-Control-Allow-Origin *
		header Access-Control-Allow-Methods "GET, POST, PUT, DELETE, PATCH, OPTIONS, HEAD"
		header Access-Control-Allow-Headers *
		header Access-Control-Expose-Headers *
	}}
	handle {{
		respond "cmux sandbox not found. Use format: port-{{port}}-{{instanceId}}.edge.test" 404
	}}
}}

http://:{p['caddy_http']} {{
	import preview
}}

https://:{p['caddy_https']} {{
	tls {cert} {key}
	import preview
}}
""")
    return path


# ---------------------------------------------------------------- the targets


class Target:
    def __init__(self, name, http_port, https_port, proc):
        self.name = name
        self.http_port = http_port
        self.https_port = https_port
        self.proc = proc
        # Sent with every request to this target: cmux-edge's session cookie under `[access]`
        # (its name has the `__Host-` prefix over TLS).
        self.headers = {}
        self.tls_headers = {}

    @property
    def pgid(self):
        return self.proc.pid


def wait_ready(t, host, timeout=20):
    """First 200 from /small through the target, or Broken."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if t.proc.poll() is not None:
            raise Broken(f"{t.name} exited with {t.proc.returncode} while starting")
        try:
            c = http.client.HTTPConnection("127.0.0.1", t.http_port, timeout=2)
            c.request("GET", "/small", headers={"Host": host, **t.headers})
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status == 200 and body == SMALL_BODY:
                return
            last = f"status {r.status} body {body[:80]!r}"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise Broken(f"{t.name} did not answer 200 on /small within {timeout}s (last: {last})")


def check_target(t, host):
    """The answers every workload relies on, over plain HTTP and TLS with SNI."""
    c = http.client.HTTPConnection("127.0.0.1", t.http_port, timeout=5)
    c.request("GET", "/64k", headers={"Host": host, **t.headers})
    r = c.getresponse()
    body = r.read()
    if r.status != 200 or len(body) != 65536:
        raise Broken(f"{t.name}: GET /64k -> {r.status}, {len(body)} bytes")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", t.https_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=host) as s:
            extra = "".join(f"{k}: {v}\r\n" for k, v in t.tls_headers.items())
            s.sendall(f"GET /small HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode())
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    if not data.startswith(b"HTTP/1.1 200") or not data.endswith(SMALL_BODY):
        raise Broken(f"{t.name}: GET /small over TLS -> {data[:200]!r}")


# ---------------------------------------------------------------- workloads


class Measure:
    """One measured round: the figure(s) plus where the CPU went."""

    def __init__(self, values, proxy_cpu, backend_cpu, load_gen_cpu):
        self.values = values
        self.proxy_cpu = proxy_cpu
        self.backend_cpu = backend_cpu
        self.load_gen_cpu = load_gen_cpu


def parse_wrk(out, label):
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise Broken(f"{label}: cannot read wrk output:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if bad and int(bad.group(1)) > 0:
        raise Broken(f"{label}: {bad.group(1)} non-2xx answers:\n{out}")
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errs and sum(int(x) for x in errs.groups()) > 0:
        log(f"{label}: wrk socket errors: {errs.group(0)}")
    v = {"rate": float(m.group(1))}
    # `--latency`: "     99%    1.23ms" (us, ms or s)
    p99 = re.search(r"^\s*99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    if p99:
        v["p99_us"] = float(p99.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[p99.group(2)]
    return v


def parse_h2load(out, label):
    m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    if not m or not codes:
        raise Broken(f"{label}: cannot read h2load output:\n{out}")
    if int(codes.group(3)) + int(codes.group(4)) > 0 or int(codes.group(1)) == 0:
        raise Broken(f"{label}: h2load status codes: {codes.group(0)}\n{out}")
    if not proto or proto.group(1) != "h2":
        raise Broken(f"{label}: HTTP/2 was not negotiated:\n{out}")
    return {"rate": float(m.group(1))}


def parse_load(out, err, label):
    lines = [x for x in out.splitlines() if x.startswith("{")]
    if not lines:
        raise Broken(f"{label}: bench_load printed nothing:\n{out}{err}")
    r = json.loads(lines[-1])
    if r.get("bad_status", 0) > 0:
        raise Broken(f"{label}: {r['bad_status']} wrong answers:\n{err[-2000:]}")
    if r.get("ops", 1) == 0:
        raise Broken(f"{label}: no successful operation:\n{err[-2000:]}")
    if r.get("errors", 0) > 0:
        log(f"{label}: {r['errors']} connection errors (reported, not fatal)")
    return r


class Bench:
    def __init__(self, args, workdir):
        self.args = args
        self.d = workdir
        self.load_core = args.load_core
        self.proxy_core = args.proxy_core
        self.ports = {
            k: free_port()
            for k in [
                "backend_http", "backend_tls", "edge_http", "edge_https", "edge_admin",
                "floor_http", "floor_https",
                "nginx_http", "nginx_https", "caddy_http", "caddy_https",
            ]
        }
        self.host = f"port-{self.ports['backend_http']}-vm-{ID}.edge.test"
        self.targets = {}
        self.backend = None

    # -- lifecycle

    def start_backend(self, cert, key):
        self.backend = spawn(
            "backend",
            pin(self.load_core) + [
                os.path.join(RELEASE, "examples", "bench_backend"),
                "--http", f"127.0.0.1:{self.ports['backend_http']}",
                "--tls", f"127.0.0.1:{self.ports['backend_tls']}",
                "--cert", cert, "--key", key,
            ],
            self.d,
        )
        t = Target("direct", self.ports["backend_http"], self.ports["backend_tls"], self.backend)
        wait_ready(t, self.host)
        self.targets["direct"] = t

    def start_proxy(self, name, cert, key):
        p = self.ports
        if name == "cmux-edge":
            extra = ""
            if self.args.edge_extra:
                with open(self.args.edge_extra) as f:
                    extra = "\n" + f.read()
            conf = cmux_edge_config(self.d, p, extra)
            binary = os.path.join(RELEASE, "cmux-edge")
            run([binary, "check", "--config", conf], timeout=30)
            proc = spawn(name, pin(self.proxy_core) + [binary, "run", "--config", conf], self.d)
            t = Target(name, p["edge_http"], p["edge_https"], proc)
            if "[access]" in extra:
                cookie = self.session_cookie(t, binary, conf)
                t.headers = {"Cookie": cookie}
                t.tls_headers = {"Cookie": f"__Host-{cookie}"}
        elif name == "floor":
            # The pingora floor (benches/compare/floor.rs): what pingora alone costs.
            binary = os.path.join(RELEASE, "examples", "pingora_floor")
            proc = spawn(name, pin(self.proxy_core) + [
                binary, "--http", f"127.0.0.1:{p['floor_http']}",
                "--upstream", f"127.0.0.1:{p['backend_http']}",
                "--https", f"127.0.0.1:{p['floor_https']}", "--cert", cert, "--key", key,
            ], self.d)
            t = Target(name, p["floor_http"], p["floor_https"], proc)
        elif name == "nginx":
            conf = nginx_config(self.d, p, cert, key, self.args.fd_limit)
            base = ["nginx", "-p", self.d, "-e", os.path.join(self.d, "nginx-error.log"), "-c", conf]
            run(base + ["-t"], timeout=30)
            proc = spawn(name, pin(self.proxy_core) + base + ["-g", "daemon off;"], self.d)
            t = Target(name, p["nginx_http"], p["nginx_https"], proc)
        elif name == "caddy":
            conf = caddy_config(self.d, p, cert, key)
            env = {"GOMAXPROCS": "1", "HOME": self.d, "XDG_DATA_HOME": self.d, "XDG_CONFIG_HOME": self.d}
            base = ["caddy", "run", "--adapter", "caddyfile", "--config", conf]
            proc = spawn(name, pin(self.proxy_core) + base, self.d, env=env)
            t = Target(name, p["caddy_http"], p["caddy_https"], proc)
        else:
            raise ValueError(name)
        wait_ready(t, self.host)
        check_target(t, self.host)
        self.targets[name] = t
        log(f"{name} ready (pid {proc.pid})")

    def session_cookie(self, t, binary, conf, timeout=20):
        """Under `[access]`: a token minted with the config's key, exchanged for the edge's
        session cookie the way a browser does (`?cmux_token=` -> 302 + Set-Cookie)."""
        token = run([binary, "token", "--config", conf, "--vm", ID,
                     "--port", str(self.ports["backend_http"]), "--ttl", "10m"], timeout=30).stdout.strip()
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", t.http_port, timeout=2)
                c.request("GET", f"/small?cmux_token={token}", headers={"Host": self.host})
                r = c.getresponse()
                r.read()
                cookie = r.getheader("Set-Cookie")
                c.close()
                if r.status == 302 and cookie:
                    return cookie.split(";", 1)[0]
                last = f"status {r.status}"
            except OSError as e:
                last = str(e)
            time.sleep(0.1)
        raise Broken(f"cmux-edge: no session cookie for the token within {timeout}s ({last})")

    # -- one measured run

    def measured(self, t, argv, timeout):
        """Runs a load tool pinned to the load core; returns its output and the CPU split."""
        hz = os.sysconf("SC_CLK_TCK")
        proxy0 = group_cpu_ticks(t.pgid) if t.name != "direct" else None
        backend0 = group_cpu_ticks(self.backend.pid)
        # The load tool is the only child reaped meanwhile: RUSAGE_CHILDREN grows by its CPU.
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.time()
        r = subprocess.run(pin(self.load_core) + argv, capture_output=True, text=True, timeout=timeout)
        wall = time.time() - start
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        backend_cpu = 100.0 * (group_cpu_ticks(self.backend.pid) - backend0) / hz / wall
        proxy_cpu = (
            100.0 * (group_cpu_ticks(t.pgid) - proxy0) / hz / wall if proxy0 is not None else None
        )
        load = 100.0 * (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) / wall
        if r.returncode != 0:
            raise Broken(f"{t.name}: {argv[0]} exited {r.returncode}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
        return r.stdout, r.stderr, (proxy_cpu, backend_cpu, load)

    def url_port(self, t, tls):
        return t.https_port if tls else t.http_port

    def run_workload(self, w, t, secs, warmup):
        """Returns a Measure, or None for workloads a target does not take part in."""
        a = self.args
        load = os.path.join(RELEASE, "examples", "bench_load")
        label = f"{w}/{t.name}"
        if w in ("h1-small", "h1-64k"):
            path = "/small" if w == "h1-small" else "/64k"
            # wrk takes whole seconds and has no warm-up: main() runs a separate short one.
            argv = [
                "wrk", "-t1", f"-c{a.h1_conns}", f"-d{max(1, round(secs))}s", "--latency",
                "-H", f"Host: {self.host}", f"http://127.0.0.1:{t.http_port}{path}",
            ] + [x for k, v in t.headers.items() for x in ("-H", f"{k}: {v}")]
            out, _, cpu = self.measured(t, argv, timeout=secs + 60)
            return Measure(parse_wrk(out, label), *cpu)
        if w == "h2-tls":
            argv = [
                "h2load", "-t1", f"-c{a.h2_conns}", f"-m{a.h2_streams}", "-D", f"{int(secs * 1000)}ms",
                f"--connect-to=127.0.0.1:{t.https_port}",
                f"https://{self.host}:{t.https_port}/small",
            ] + [x for k, v in t.tls_headers.items() for x in ("-H", f"{k}: {v}")]
            if warmup > 0:
                argv.insert(1, f"--warm-up-time={int(warmup * 1000)}ms")
            out, _, cpu = self.measured(t, argv, timeout=secs + warmup + 60)
            return Measure(parse_h2load(out, label), *cpu)
        if t.headers:
            raise Broken(f"{label}: bench_load sends no extra headers; measure [access] with "
                         "--workloads h1-small,h1-64k,h2-tls")
        common = ["--host", self.host, "--secs", str(secs), "--warmup", str(warmup)]
        if w in ("tls-new", "tls-resume"):
            argv = [load, "tls-new", "--addr", f"127.0.0.1:{t.https_port}", "--path", "/small",
                    "--conns", str(a.tls_conns)] + common
            if w == "tls-resume":
                argv.append("--resume")
        elif w == "ws-echo":
            argv = [load, "ws-echo", "--addr", f"127.0.0.1:{t.http_port}", "--path", "/ws",
                    "--conns", str(a.ws_conns), "--size", "64"] + common
        elif w == "latency":
            argv = [load, "http-rate", "--addr", f"127.0.0.1:{t.http_port}", "--path", "/small",
                    "--conns", str(a.rate_conns), "--rate", str(a.rate)] + common
        else:
            raise ValueError(w)
        out, err, cpu = self.measured(t, argv, timeout=secs + warmup + 120)
        return Measure(parse_load(out, err, label), *cpu)

    def idle_websockets(self, t, n):
        """RSS growth of the target's processes while n WebSockets sit idle through it."""
        load = os.path.join(RELEASE, "examples", "bench_load")
        before = group_rss_kib(t.pgid)
        p = subprocess.Popen(
            pin(self.load_core) + [
                load, "ws-idle", "--addr", f"127.0.0.1:{t.http_port}", "--host", self.host,
                "--path", "/ws", "--conns", str(n), "--secs", "300", "--size", "16",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            line = p.stdout.readline()
            if not line:
                raise Broken(f"ws-idle/{t.name}: load tool died: {p.stderr.read()[-2000:]}")
            r = json.loads(line)
            time.sleep(1.0)  # let lazily freed buffers settle
            after = group_rss_kib(t.pgid)
        finally:
            if p.stdin:
                p.stdin.close()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if r["ready"] == 0:
            raise Broken(f"ws-idle/{t.name}: no WebSocket opened ({r['first_error']})")
        if r["failed"]:
            log(f"ws-idle/{t.name}: {r['failed']} of {n} failed to open: {r['first_error']}")
        per = (after - before) / r["ready"]
        return {"kib_per_conn": per, "rss_before_mib": before / 1024, "rss_after_mib": after / 1024,
                "opened": r["ready"], "failed": r["failed"]}


# ---------------------------------------------------------------- report

WORKLOADS = ["h1-small", "h1-64k", "h2-tls", "tls-new", "tls-resume", "ws-echo", "latency"]

ROWS = [
    # (workload, value key, label, unit, higher is better)
    ("h1-small", "rate", "HTTP/1.1 keep-alive, 32 B response (wrk)", "req/s", True),
    ("h1-64k", "rate", "HTTP/1.1 keep-alive, 64 KiB response (wrk)", "req/s", True),
    ("h1-64k", "p99_us", "HTTP/1.1 64 KiB p99 (at saturation)", "µs", False),
    ("h2-tls", "rate", "HTTP/2 over TLS 1.3, 32 B response (h2load)", "req/s", True),
    ("tls-new", "rate", "New TLS 1.3 connection per request, full handshake, KEY", "conn/s", True),
    ("tls-resume", "rate", "New TLS 1.3 connection per request, resumed session, KEY", "conn/s", True),
    ("ws-echo", "rate", "WebSocket echo, 64 B messages", "round trips/s", True),
    ("ws-echo", "p99_us", "WebSocket echo p99 (at saturation)", "µs", False),
    ("latency", "p50_us", "Latency p50 at fixed rate", "µs", False),
    ("latency", "p99_us", "Latency p99 at fixed rate", "µs", False),
    ("latency", "p999_us", "Latency p99.9 at fixed rate", "µs", False),
]


def fmt(x):
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def cell(vals):
    if not vals:
        return "—"
    med = statistics.median(vals)
    if len(vals) == 1:
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(vals))}–{fmt(max(vals))})"


def ratio(a, b):
    if not a or not b:
        return "—"
    return f"{statistics.median(a) / statistics.median(b):.2f}"


def machine_facts():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) // 1024} MiB"
    except OSError:
        pass
    return model, os.cpu_count(), mem


def busy_processes():
    """The other CPU users right now (e.g. compilers), for an honest note on the conditions."""
    try:
        # top's second sample covers the last second; its first is since boot.
        r = subprocess.run(["top", "-b", "-n", "2", "-d", "1", "-w", "200"], capture_output=True,
                           text=True, timeout=15)
        block = r.stdout.rsplit("\ntop - ", 1)[-1].splitlines()
        hdr = next(i for i, ln in enumerate(block) if ln.split()[:1] == ["PID"])
        busy = []
        for ln in block[hdr + 1:]:
            f = ln.split()
            if len(f) >= 12 and float(f[8]) >= 10.0:
                busy.append(f"{f[11]} {float(f[8]):.0f}%")
        return ", ".join(busy[:8]) or "none above 10% of a CPU"
    except (OSError, ValueError, StopIteration, subprocess.TimeoutExpired):
        return "?"


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def report(args, results, mem, conditions, targets, elapsed):
    model, ncpu, memtotal = machine_facts()
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or "?"
    mode = "quick (CI smoke: figures are indicative only)" if args.quick else "full"
    L = []
    L.append(f"Generated by `benches/compare/run{' --quick' if args.quick else ''}` on "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, mode: {mode}, "
             f"{elapsed / 60:.1f} min.")
    L.append("")
    L.append("### Machine and versions")
    L.append("")
    L.append("| | |")
    L.append("|---|---|")
    L.append(f"| CPU | {model}, {ncpu} logical CPUs; proxy pinned to CPU {args.proxy_core}, load "
             f"generator + backend to CPU {args.load_core} |")
    L.append(f"| memory | {memtotal} |")
    L.append(f"| kernel | {platform.release()} |")
    L.append(f"| cmux-edge | {git} (release, `[server] threads = 1`) |")
    L.append(f"| nginx | {tool_version(['nginx', '-v'])} (`worker_processes 1`) |")
    L.append(f"| Caddy | {tool_version(['caddy', 'version'])} (`GOMAXPROCS=1`) |")
    L.append(f"| wrk / h2load | {tool_version(['wrk', '-v'])} / {tool_version(['h2load', '--version'])} |")
    L.append(f"| OpenSSL | {tool_version(['openssl', 'version'])} |")
    L.append(f"| rustc | {tool_version(['rustc', '-V'])} |")
    L.append(f"| rounds | {args.rounds} × {args.secs} s per target and workload after {args.warmup} s "
             f"warm-up, targets interleaved round by round |")
    L.append(f"| load average before / after | {conditions['load_before']} / {conditions['load_after']} |")
    L.append(f"| other CPU users before | {conditions['busy_before']} |")
    L.append(f"| other CPU users after | {conditions['busy_after']} |")
    L.append("")
    L.append("### Throughput and latency")
    L.append("")
    L.append("Median of the rounds, (min–max) in brackets. Ratios are of medians; for µs and "
             "KiB rows lower is better.")
    L.append("")
    L.append("| workload | unit | direct | pingora floor | cmux-edge | nginx | Caddy | edge/floor | edge/nginx | edge/Caddy | edge/direct |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for w, key, label, unit, _ in ROWS:
        if w not in results:
            continue
        extra = ""
        if w == "latency":
            extra = f" ({args.rate} req/s, {args.rate_conns} conns)"
        elif w == "h1-small" or w == "h1-64k":
            extra = f" (-c{args.h1_conns})"
        elif w == "h2-tls":
            extra = f" (-c{args.h2_conns} -m{args.h2_streams})"
        elif w in ("tls-new", "tls-resume"):
            extra = f" ({args.tls_conns} loops)"
        elif w == "ws-echo":
            extra = f" ({args.ws_conns} conns)"
        label = label.replace("KEY", KEY_NAMES[args.key])
        v = {t: [m.values[key] for m in results[w].get(t, [])] for t in TARGETS}
        L.append(f"| {label}{extra} | {unit} | {cell(v['direct'])} | {cell(v['floor'])} | "
                 f"{cell(v['cmux-edge'])} | {cell(v['nginx'])} | {cell(v['caddy'])} | "
                 f"{ratio(v['cmux-edge'], v['floor'])} | {ratio(v['cmux-edge'], v['nginx'])} | "
                 f"{ratio(v['cmux-edge'], v['caddy'])} | {ratio(v['cmux-edge'], v['direct'])} |")
    if mem:
        n = max(m["opened"] for m in mem.values())
        per = {t: [mem[t]["kib_per_conn"]] if t in mem else [] for t in TARGETS}
        L.append(f"| Idle WebSockets: RSS growth per connection ({n:,} open) | KiB | — | "
                 f"{cell(per['floor'])} | {cell(per['cmux-edge'])} | {cell(per['nginx'])} | "
                 f"{cell(per['caddy'])} | {ratio(per['cmux-edge'], per['floor'])} | "
                 f"{ratio(per['cmux-edge'], per['nginx'])} | {ratio(per['cmux-edge'], per['caddy'])} | — |")
        base = {t: [mem[t]["rss_before_mib"]] if t in mem else [] for t in TARGETS}
        L.append(f"| RSS before the idle WebSockets | MiB | — | {cell(base['floor'])} | "
                 f"{cell(base['cmux-edge'])} | {cell(base['nginx'])} | {cell(base['caddy'])} | "
                 f"— | — | — | — |")
        fails = [f"{t}: {m['failed']} failed" for t, m in mem.items() if m["failed"]]
        if fails:
            L.append("")
            L.append(f"WebSockets that failed to open: {', '.join(fails)}.")
    L.append("")
    L.append("### Work per CPU-second of the proxy")
    L.append("")
    L.append("Each round's throughput divided by the share of its core the proxy actually got. "
             "On a machine shared with other work this is steadier than raw throughput, and it "
             "is the fair comparison when a proxy could not saturate its core.")
    L.append("")
    L.append("| workload | unit | pingora floor | cmux-edge | nginx | Caddy | edge/floor | edge/nginx | edge/Caddy |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for w, key, label, unit, higher in ROWS:
        if w not in results or key != "rate":
            continue
        v = {t: [m.values["rate"] * 100.0 / m.proxy_cpu for m in results[w].get(t, [])
                 if m.proxy_cpu] for t in PROXIES}
        label = label.replace("KEY", KEY_NAMES[args.key])
        L.append(f"| {label} | {unit} per CPU-s | {cell(v['floor'])} | {cell(v['cmux-edge'])} | "
                 f"{cell(v['nginx'])} | {cell(v['caddy'])} | {ratio(v['cmux-edge'], v['floor'])} | "
                 f"{ratio(v['cmux-edge'], v['nginx'])} | {ratio(v['cmux-edge'], v['caddy'])} |")
    L.append("")
    L.append("### Where the CPU went")
    L.append("")
    L.append("Median % of one core during the measured runs, from /proc and getrusage: the "
             "proxy's processes (alone on their core), the backend and the load generator "
             "(sharing the other core). Proxy and load core together are the budget: where "
             "neither side reaches its core, something else on the machine took the rest.")
    L.append("")
    L.append("| workload | direct: backend / load gen | pingora floor: proxy / backend / load gen | "
             "cmux-edge: proxy / backend / load gen | nginx: proxy / backend / load gen | "
             "Caddy: proxy / backend / load gen |")
    L.append("|---|---|---|---|---|---|")
    for w in WORKLOADS:
        if w not in results:
            continue
        cells = []
        for t in TARGETS:
            ms = results[w].get(t, [])
            if not ms:
                cells.append("—")
                continue
            med = lambda xs: fmt(statistics.median(xs)) if xs and None not in xs else "—"
            parts = [] if t == "direct" else [med([m.proxy_cpu for m in ms])]
            parts += [med([m.backend_cpu for m in ms]), med([m.load_gen_cpu for m in ms])]
            cells.append(" / ".join(parts))
        L.append(f"| {w} | " + " | ".join(cells) + " |")
    L.append("")
    L.append("### Targets (issue 7, then issue 15)")
    L.append("")
    L.extend(targets)
    return "\n".join(L) + "\n"


def judge(results, mem):
    """The issue's targets, evaluated on medians. Reported, never asserted."""
    def med(w, t, key="rate"):
        ms = results.get(w, {}).get(t, [])
        return statistics.median([m.values[key] for m in ms]) if ms else None

    out = []

    def line(ok, text):
        out.append(f"- {'met' if ok else '**missed**'}: {text}")

    def per_cpu(w, t):
        ms = [m for m in results.get(w, {}).get(t, []) if m.proxy_cpu]
        return statistics.median([m.values["rate"] * 100.0 / m.proxy_cpu for m in ms]) if ms else None

    for w in ["h1-small", "h1-64k", "h2-tls", "tls-new", "tls-resume"]:
        e, n, c = med(w, "cmux-edge"), med(w, "nginx"), med(w, "caddy")
        if e is None:
            continue
        pe = per_cpu(w, "cmux-edge")
        for other, need, name in ((n, 1, "nginx"), (c, 2, "Caddy")):
            if other is None:
                continue
            po = per_cpu(w, "nginx" if name == "nginx" else "caddy")
            eff = f"; per proxy CPU-second {pe / po:.2f}×" if pe and po else ""
            line(e >= need * other, f"{w} throughput ≥ {'2× ' if need == 2 else ''}{name} "
                 f"({fmt(e)} vs {fmt(other)}, {e / other:.2f}×{eff})")
    e, n = med("latency", "cmux-edge", "p99_us"), med("latency", "nginx", "p99_us")
    if e is not None and n is not None:
        line(e <= n, f"p99 at fixed moderate rate no worse than nginx ({fmt(e)} µs vs {fmt(n)} µs)")
    if "cmux-edge" in mem:
        k = mem["cmux-edge"]["kib_per_conn"]
        line(k <= 16, f"≤ 16 KiB RSS per idle WebSocket ({fmt(k)} KiB)")
    e, d = med("h1-small", "cmux-edge"), med("h1-small", "direct")
    if e is not None and d is not None:
        line(e >= 0.7 * d, f"HTTP/1.1 small ≥ 70% of direct ({100 * e / d:.0f}%)")

    # Issue 15: CPU per request against the pingora floor, the 64 KiB tail, HTTP/2, idle memory.
    for w in ["h1-small", "h1-64k"]:
        pe, pf = per_cpu(w, "cmux-edge"), per_cpu(w, "floor")
        if pe and pf:
            line(pf / pe <= 1.10, f"{w} CPU per request ≤ 1.10× the pingora floor "
                 f"({1e6 / pe:.1f} µs vs {1e6 / pf:.1f} µs, {pf / pe:.2f}×)")
    e, n = med("h1-64k", "cmux-edge", "p99_us"), med("h1-64k", "nginx", "p99_us")
    if e is not None and n is not None:
        line(e <= 2 * n, f"h1-64k p99 ≤ 2× nginx's ({fmt(e)} µs vs {fmt(n)} µs, {e / n:.2f}×)")
    rates = [m.values["rate"] for m in results.get("h1-64k", {}).get("cmux-edge", [])]
    if len(rates) > 1:
        line(min(rates) >= 0.85 * max(rates), f"h1-64k no bimodal rounds: min ≥ 85% of max "
             f"({fmt(min(rates))} vs {fmt(max(rates))}, {min(rates) / max(rates):.0%})")
    pe, pn = per_cpu("h2-tls", "cmux-edge"), per_cpu("h2-tls", "nginx")
    if pe and pn:
        line(pe >= 0.8 * pn, f"h2-tls ≥ 0.8× nginx per proxy CPU-second ({fmt(pe)} vs {fmt(pn)}, "
             f"{pe / pn:.2f}×)")
    if "cmux-edge" in mem:
        k = mem["cmux-edge"]["kib_per_conn"]
        line(k <= 32, f"≤ 32 KiB RSS per idle WebSocket ({fmt(k)} KiB; nginx "
             f"{fmt(mem['nginx']['kib_per_conn']) if 'nginx' in mem else '—'} KiB)")
    for w in ["h1-small", "h1-64k"]:
        pe, pn = per_cpu(w, "cmux-edge"), per_cpu(w, "nginx")
        if pe and pn:
            line(pe >= pn, f"stretch: {w} CPU per request ≤ nginx's ({1e6 / pe:.1f} µs vs "
                 f"{1e6 / pn:.1f} µs)")
    return out


START_MARK = "<!-- generated by benches/compare/run: start -->"
END_MARK = "<!-- generated by benches/compare/run: end -->"


def write_results(path, body):
    """Replaces the generated block and keeps any hand-written analysis around it."""
    head, tail = "# Side-by-side benchmark results\n\n", "\n"
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if START_MARK in old and END_MARK in old:
            head = old.split(START_MARK, 1)[0]
            tail = old.split(END_MARK, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{START_MARK}\n{body}{END_MARK}{tail}")


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one 2 s round per workload (CI smoke)")
    ap.add_argument("--out", help="results file (default: benches/RESULTS.md, quick: a temp file)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--secs", type=float, help="seconds per measured round")
    ap.add_argument("--warmup", type=float)
    ap.add_argument("--only", default=",".join(TARGETS), help="comma-separated targets")
    ap.add_argument("--workloads", default=",".join(WORKLOADS + ["ws-idle"]))
    ap.add_argument("--idle-ws", type=int, help="idle WebSockets to hold (full: 10000)")
    ap.add_argument("--rate", type=int, help="total req/s of the latency workload")
    ap.add_argument("--edge-extra", help="a TOML file appended to cmux-edge's config, to measure "
                    "what a feature costs (e.g. [limits] or [wake]); the baseline has none")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--key", choices=sorted(KEY_ARGS), default="p256",
                    help="key type of the TLS certificate (default: p256)")
    ap.add_argument("--proxy-core", type=int, help="default: the second CPU we may run on")
    ap.add_argument("--load-core", type=int, help="default: the first CPU we may run on")
    args = ap.parse_args()
    q = args.quick
    args.rounds = args.rounds or (1 if q else 5)
    args.secs = args.secs or (2 if q else 5)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if q else 2)
    args.idle_ws = args.idle_ws or (1000 if q else 10000)
    # A proxy holds two descriptors per WebSocket (client + upstream), and nginx wants ~10%
    # of worker_connections spare on top ("worker_connections are not enough" at 9,400 of 20,000).
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if 2 * args.idle_ws > int(fd_limit * 0.9):
        fitted = int(fd_limit * 0.9) // 2
        log(f"ulimit -n is {fd_limit}: holding {fitted} idle WebSockets instead of {args.idle_ws}")
        args.idle_ws = fitted
    args.fd_limit = fd_limit
    args.rate = args.rate or (1000 if q else 2000)
    args.h1_conns, args.h2_conns, args.h2_streams = 50, 10, 10
    args.tls_conns, args.ws_conns, args.rate_conns = 16, 50, 20
    # CI containers may be limited to some CPUs: pick from the ones we are allowed.
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        log("fewer than 2 usable CPUs: no pinning, proxy and load share the CPU")
        args.proxy_core = args.load_core = None
    else:
        args.load_core = allowed[0] if args.load_core is None else args.load_core
        args.proxy_core = allowed[1] if args.proxy_core is None else args.proxy_core
    out = args.out
    if not out and q:
        fd, out = tempfile.mkstemp(prefix="cmux-edge-bench-", suffix=".md")
        os.close(fd)
    out = out or os.path.join(ROOT, "benches", "RESULTS.md")
    only = [t for t in TARGETS if t in args.only.split(",")]
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS + ["ws-idle"]:
            ap.error(f"unknown workload {w}")

    atexit.register(cleanup)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started = time.time()
    conditions = {"load_before": loadavg(), "busy_before": busy_processes()}

    keep = tempfile.mkdtemp(prefix="cmux-edge-compare-") if args.keep else None
    with contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(
        prefix="cmux-edge-compare-"
    ) as d:
        if keep:
            log(f"configs and logs kept in {d}")
        b = Bench(args, d)
        cert, key = make_cert(d, args.key)
        try:
            b.start_backend(cert, key)
            log(f"backend ready; preview host {b.host}")
            for name in only:
                if name != "direct":
                    b.start_proxy(name, cert, key)
            mem = {}
            if "ws-idle" in workloads:
                # First, on fresh processes: earlier workloads would leave freed memory behind
                # for these connections to reuse, which would flatter the figure.
                for name in only:
                    if name == "direct":
                        continue
                    mem[name] = b.idle_websockets(b.targets[name], args.idle_ws)
                    log(f"ws-idle/{name}: {mem[name]['kib_per_conn']:.1f} KiB per connection, "
                        f"{mem[name]['opened']} open")
            results = {}
            for w in [w for w in WORKLOADS if w in workloads]:
                results[w] = {t: [] for t in only}
                for name in only:
                    if args.warmup > 0 and w in ("h1-small", "h1-64k"):
                        b.run_workload(w, b.targets[name], args.warmup, 0)  # wrk has no warm-up
                for r in range(args.rounds):
                    order = only[r % len(only):] + only[: r % len(only)]
                    for name in order:
                        warm = args.warmup if r == 0 and w not in ("h1-small", "h1-64k") else 0
                        m = b.run_workload(w, b.targets[name], args.secs, warm)
                        results[w][name].append(m)
                        v = m.values
                        log(f"{w}/{name} round {r + 1}: {fmt(v['rate'])}/s"
                            + (f", p99 {v['p99_us']} µs" if "p99_us" in v else "")
                            + (f", proxy CPU {m.proxy_cpu:.0f}%" if m.proxy_cpu is not None else ""))
            for name, t in b.targets.items():
                if t.proc.poll() is not None:
                    raise Broken(f"{name} died during the run (exit {t.proc.returncode})")
            nginx_err = os.path.join(d, "nginx-error.log")
            if os.path.exists(nginx_err):
                with open(nginx_err) as f:
                    spooled = sum("buffered to a temporary file" in x for x in f)
                if spooled:
                    log(f"nginx spooled {spooled} responses to temp files (proxy_buffering default)")
        except Broken:
            for name in ("cmux-edge", "nginx", "caddy", "backend"):
                p = os.path.join(d, f"{name}.log")
                if os.path.exists(p):
                    with open(p, errors="replace") as f:
                        tail = f.read()[-1500:]
                    if tail.strip():
                        log(f"--- last lines of {name}.log ---\n{tail}")
            raise
        finally:
            cleanup()

    conditions.update(load_after=loadavg(), busy_after=busy_processes())
    body = report(args, results, mem, conditions, judge(results, mem), time.time() - started)
    write_results(out, body)
    print(body)
    log(f"results written to {out} ({(time.time() - started) / 60:.1f} min)")


if __name__ == "__main__":
    try:
        main()
    except Broken as e:
        log(f"BROKEN: {e}")
        sys.exit(1)
