#!/usr/bin/env python3
"""Storage that ends, for bench/abuse: replays the issue's storage scenarios against a
release `web` + `processor` + `notifier` on Redis and against `serve`, each on a fresh
process (and a fresh Redis key prefix, removed after), and prints one markdown row per
scenario.

  abuse_storage.py BIN

Scenarios:
  extra     100 jobs with a 1 MB `extra` (the answer; the store's growth)
  aggrs     20,000 jobs in 20,000 aggregations, pending: cost of /metrics and of
            /dashboard/aggregations; then drained: aggregation records left
  failed    50 jobs whose callback fails, with notifier.failed_retention 1.7 s: records and
            files left once the deletion loop has run

Standard library only; every wait has a deadline.
"""
import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/downloader")
MB = 1_000_000


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Origin(http.server.ThreadingHTTPServer):
    daemon_threads = True


def start_origin():
    """Serves /f (a small text file); POST /ok answers 200, POST /fail 500."""
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a):
            pass

        def do_GET(self):
            body = b"hello\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(500 if self.path == "/fail" else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    srv = Origin(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def redis(*args):
    return subprocess.run(["redis-cli", "-h", "127.0.0.1", *args], capture_output=True,
                          text=True, timeout=60).stdout


def redis_keys(prefix, pattern="*"):
    out = redis("--scan", "--pattern", f"{prefix}:{pattern}", "--count", "1000")
    return [k for k in out.split("\n") if k]


def redis_bytes(prefix):
    total = 0
    for k in redis_keys(prefix):
        total += int(redis("memory", "usage", k).strip() or 0)
    return total


def du(path):
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.stat(os.path.join(root, n)).st_blocks * 512
            except OSError:
                pass
    return total


class Setup:
    """`serve`, or web + processor + notifier on Redis under a fresh prefix."""

    def __init__(self, kind, tmp, notifier=None, components=None):
        self.kind, self.tmp, self.procs = kind, tmp, []
        self.port = free_port()
        self.prefix = f"bench-storage:{os.getpid()}:{self.port}"
        self.files = os.path.join(tmp, "files")
        cfg = {
            "processor": {"storage_dir": self.files, "stats_interval": 1000,
                          "download_url": f"http://127.0.0.1:{self.port}/files",
                          "allowed_networks": ["127.0.0.0/8"]},
            "notifier": dict({"stats_interval": 1000, "deletion_interval": 1,
                              "allowed_networks": ["127.0.0.0/8"]}, **(notifier or {})),
            "backends": {"http": {"timeout": 10}},
        }
        if kind == "serve":
            cfg["store"] = {"type": "embedded", "path": os.path.join(tmp, "store.redb")}
        else:
            cfg["redis"] = {"addr": "127.0.0.1:6379", "key_prefix": self.prefix}
        self.config = os.path.join(tmp, "config.json")
        with open(self.config, "w") as f:
            json.dump(cfg, f)
        if kind == "serve":
            self.start("serve", ["--port", str(self.port)])
        else:
            self.start("web", ["--port", str(self.port)])
            for c in ("processor", "notifier") if components is None else components:
                self.start(c, [])
        wait_for(lambda: self.get("/hb")[0] == 200, 20, "the API to answer /hb")

    def start(self, what, args):
        log = open(os.path.join(self.tmp, f"{what}.log"), "w")
        p = subprocess.Popen([BIN, what, "-c", self.config, *args], stdout=subprocess.DEVNULL,
                             stderr=log, env=dict(os.environ, RUST_LOG="warn"))
        self.procs.append(p)

    def req(self, method, path, body=None, timeout=60):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            return r.status, r.read(), dict(r.getheaders())
        except OSError as e:
            return 0, str(e).encode(), {}
        finally:
            c.close()

    def get(self, path):
        return self.req("GET", path)

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        if self.kind != "serve":
            keys = redis_keys(self.prefix)
            for i in range(0, len(keys), 500):
                redis("del", *keys[i:i + 500])


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def submit_many(s, bodies, threads=8):
    """POSTs every body on keep-alive connections; returns the status counts."""
    counts, lock, it = {}, threading.Lock(), iter(bodies)

    def run():
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        while True:
            with lock:
                body = next(it, None)
            if body is None:
                break
            try:
                c.request("POST", "/download", body=body, headers={"Content-Type": "application/json"})
                r = c.getresponse()
                r.read()
                st = r.status
            except OSError:
                c.close()
                c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
                st = 0
            with lock:
                counts[st] = counts.get(st, 0) + 1
        c.close()

    ts = [threading.Thread(target=run) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(600)
    return " ".join(f"{n}× {st}" for st, n in sorted(counts.items()))


def job(origin, aggr, cb="ok", extra=None):
    j = {"aggr_id": aggr, "aggr_limit": 4, "url": f"http://127.0.0.1:{origin}/f",
         "callback_url": f"http://127.0.0.1:{origin}/{cb}"}
    if extra is not None:
        j["extra"] = extra
    return json.dumps(j)


def timed_get(s, path, n=5):
    """Worst of n GETs: ms and bytes of the body."""
    worst, size = 0.0, 0
    for _ in range(n):
        t = time.monotonic()
        st, body, _ = s.get(path)
        worst = max(worst, (time.monotonic() - t) * 1000)
        size = len(body)
        assert st == 200, f"{path}: {st} {body[:200]!r}"
    return worst, size


def store_size(s):
    if s.kind == "serve":
        return os.path.getsize(os.path.join(s.tmp, "store.redb"))
    return redis_bytes(s.prefix)


rows = []
origin = start_origin()
oport = origin.server_address[1]
# `serve` downloads as soon as a job is in: its jobs for the pending scenario go to a
# port that accepts connections (the kernel's backlog) and never answers, so that all
# but the processor's slots stay pending.
tarpit = socket.socket()
tarpit.bind(("127.0.0.1", 0))
tarpit.listen(4096)
tport = tarpit.getsockname()[1]

for kind in ("redis", "serve"):
    with tempfile.TemporaryDirectory() as tmp:
        # extra: nothing stored past the cap.
        s = Setup(kind, tmp, components=())
        before = store_size(s)
        got = submit_many(s, [job(oport, "extra", extra="x" * MB) for _ in range(100)])
        grown = store_size(s) - before
        rows.append((kind, "100 jobs with a 1 MB `extra`", got, f"store +{grown / MB:.2f} MB",
                     "api.max_extra_bytes (64 KiB): 400"))
        s.stop()

    with tempfile.TemporaryDirectory() as tmp:
        # aggrs: 20,000 pending aggregations, then drained.
        s = Setup(kind, tmp, components=())
        port = tport if kind == "serve" else oport
        got = submit_many(s, [job(port, f"a{i}") for i in range(20000)])
        m_ms, m_size = timed_get(s, "/metrics")
        d_ms, d_size = timed_get(s, "/dashboard/aggregations")
        rows.append((kind, "20,000 aggregations" + (" (all but the slots pending)" if kind == "serve" else " pending"), got,
                     f"/metrics {m_ms:.0f} ms, {m_size / 1000:.0f} kB; /dashboard/aggregations "
                     f"{d_ms:.0f} ms, {d_size / 1000:.0f} kB",
                     "top 20 series; pages of 1000 (X-Total-Count)"))
        if kind == "serve":
            s.stop()
            s = None
        else:
            s.start("processor", [])
            s.start("notifier", [])

        def drained():
            st, body, _ = s.get("/dashboard/aggregations")
            return st == 200 and json.loads(body) == []
        if s is not None:
            t = time.monotonic()
            wait_for(drained, 600, "the queues to drain")
            # Records of delivered jobs go after notifier.deletion_interval (1 s).
            wait_for(lambda: not redis_keys(s.prefix, "job:*"), 300, "job records to be deleted")
            left = len(redis_keys(s.prefix, "aggr:*"))
            rows.append((kind, "… then drained", f"drained in {time.monotonic() - t:.0f} s",
                         f"{left} `aggr:*` records left, store {store_size(s) / 1000:.0f} kB",
                         "an aggregation's record goes with its last job"))
            s.stop()

    with tempfile.TemporaryDirectory() as tmp:
        # failed: dead letters expire with their files.
        s = Setup(kind, tmp, notifier={"failed_retention": 0.00002, "callback_retries": 0})
        ids, codes = [], {}
        for _ in range(50):
            st, body, _ = s.req("POST", "/download", job(oport, "dead", cb="fail"))
            codes[st] = codes.get(st, 0) + 1
            if st == 201:
                ids.append(json.loads(body)["id"])
        got = " ".join(f"{n}× {st}" for st, n in sorted(codes.items()))

        def gone():
            # Every job failed its callback, expired and was deleted (404), files too.
            return all(s.get(f"/jobs/{i}")[0] == 404 for i in ids) and du(s.files) == 0
        wait_for(gone, 300, "failed callbacks to expire")
        if kind == "serve":
            left = "store file " + f"{store_size(s) / 1000:.0f} kB"
        else:
            left = f"{len(redis_keys(s.prefix, 'job:*'))} job records left"
        rows.append((kind, "50 failed callbacks, failed_retention 1.7 s", got,
                     f"{left}, files {du(s.files) / 1000:.0f} kB",
                     "notifier.failed_retention (7 days): then deleted with their files"))
        s.stop()

origin.shutdown()
print("| store | scenario | clients got | what stays | bound |")
print("|---|---|---|---|---|")
for r in rows:
    print("| " + " | ".join(r) + " |")
