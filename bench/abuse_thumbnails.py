#!/usr/bin/env python3
"""Replays the thumbnail abuse scenarios of the issue "Bounded by design" against a release
`downloader web` (Redis) and `downloader serve` (embedded store) and prints a table: peak
RSS (VmHWM), idle RSS after the attack, disk used, the victim job's thumbnail latency, and
the configured thumbnail memory budget. Every scenario runs in a fresh process.

    bench/abuse-thumbnails            (the wrapper builds the release binary first)
    ALLOC=jemalloc bench/abuse-thumbnails   (LD_PRELOAD libjemalloc with background purge)

Standard library only; fixtures are made here (PNG by hand with zlib).
"""
import http.client, http.server, json, os, socket, struct, subprocess, sys, tempfile
import threading, time, zlib

BIN = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else "target/release/downloader")
ALLOC = os.environ.get("ALLOC", "glibc")
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(w, h, depth, ctype, row, extra=b""):
    """A PNG whose every row is `row` (filter byte included)."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, 0)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def tiny_png():  # 69 bytes: 1x1 RGB
    return png(1, 1, 8, 2, b"\x00\xc8\x0a\x0a")


def big16_png():  # 7000x7000 16-bit RGBA, a gradient: ~380 KB
    row = b"\x01" + b"\x00\x10\x00\x20\x00\x30\xff\xff" + b"\x00\x01\x00\x00\x00\x00\x00\x00" * 6999
    return png(7000, 7000, 16, 6, row)


def iccp_bomb():  # 1x1 PNG, iCCP = 2 GiB of zeros compressed (~2 MB)
    z = zlib.compressobj(9)
    block = bytes(1 << 24)
    comp = b"".join(z.compress(block) for _ in range(128)) + z.flush()
    return png(1, 1, 8, 2, b"\x00\xc8\x0a\x0a", chunk(b"iCCP", b"bomb\x00\x00" + comp))


def photo_png(w=1500, h=1000):  # the victim: an 8-bit RGB gradient
    row = b"\x01" + bytes([10, 20, 30]) + bytes([1, 1, 1]) * (w - 1)
    return png(w, h, 8, 2, row)


class Origin(http.server.ThreadingHTTPServer):
    daemon_threads = True


def start_origin(files):
    callbacks = {}
    cond = threading.Condition()

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = files.get(self.path)
            if body is None:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            n = int(self.headers.get("Content-Length", "0"))
            v = json.loads(self.rfile.read(n) or b"{}")
            with cond:
                callbacks[v.get("job_id")] = (time.monotonic(), v)
                cond.notify_all()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    srv = Origin(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, callbacks, cond


def status_of(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for l in f:
                if l.startswith(key + ":"):
                    return int(l.split()[1]) * 1024
    except OSError:
        return 0
    return 0


def du(path):
    total = 0
    for root, _, names in os.walk(path):
        for n in names:
            try:
                total += os.stat(os.path.join(root, n)).st_blocks * 512
            except OSError:
                pass
    return total


class Proc:
    def __init__(self, component, tmp, redis_prefix=None):
        self.port = free_port()
        self.tmp = tmp
        files = os.path.join(tmp, "files")
        cfg = {
            "processor": {"storage_dir": files, "download_url": f"http://127.0.0.1:{self.port}/files",
                          "allowed_networks": ["127.0.0.0/8"], "stats_interval": 1000},
            "notifier": {"concurrency": 16, "stats_interval": 1000, "deletion_interval": 600,
                         "allowed_networks": ["127.0.0.0/8"]},
            "backends": {"http": {"timeout": 60}},
            "api": {"max_body_bytes": 8 << 20},
        }
        if component == "web":
            cfg["redis"] = {"addr": "127.0.0.1:6379", "key_prefix": redis_prefix}
        else:
            cfg["store"] = {"type": "embedded", "path": os.path.join(tmp, "store.redb")}
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump(cfg, f)
        env = dict(os.environ, RUST_LOG="warn")
        if ALLOC == "jemalloc":
            env["LD_PRELOAD"] = JEMALLOC
            env["MALLOC_CONF"] = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"
        self.p = subprocess.Popen([BIN, component, "-c", path, "--port", str(self.port)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "log"), "w"))
        deadline = time.monotonic() + 20
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/hb")
                c.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline or self.p.poll() is not None:
                    raise SystemExit(f"{component} did not start: see {tmp}/log")
                time.sleep(0.05)

    def req(self, method, path, body=b"", ctype="application/octet-stream", timeout=120):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        c.request(method, path, body=body, headers={"Content-Type": ctype})
        r = c.getresponse()
        data = r.read()
        return r.status, data

    def hwm(self):
        return status_of(self.p.pid, "VmHWM")

    def idle_rss(self):
        # After the attack: give a purging allocator its decay time (bounded).
        deadline, last = time.monotonic() + 8, None
        while time.monotonic() < deadline:
            time.sleep(1)
            cur = status_of(self.p.pid, "VmRSS")
            if last is not None and abs(cur - last) < (1 << 20):
                return cur
            last = cur
        return status_of(self.p.pid, "VmRSS")

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(30)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(10)


def parallel(n, f):
    out = [None] * n

    def run(i):
        try:
            out[i] = f(i)
        except Exception as e:  # a refused or dropped connection is a result too
            out[i] = (type(e).__name__, b"")

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    return out


def statuses(results):
    counts = {}
    for r in results:
        k = str(r[0]) if r else "none"
        counts[k] = counts.get(k, 0) + 1
    return " ".join(f"{n}×{k}" for k, n in sorted(counts.items()))


MiB = 1 << 20
TINY, BIG, BOMB, PHOTO = tiny_png(), big16_png(), iccp_bomb(), photo_png()
files = {"/tiny.png": TINY, "/photo.png": PHOTO}
origin, callbacks, cond = start_origin(files)
oport = origin.server_address[1]
with open("/proc/meminfo") as f:
    total_ram = int(f.readline().split()[1]) * 1024
budget = min(max(total_ram // 4, 256 * MiB), 1024 * MiB)
rows = []


def job(name, specs, path="/tiny.png"):
    return json.dumps({"aggr_id": name, "aggr_limit": 4, "url": f"http://127.0.0.1:{oport}{path}",
                       "callback_url": f"http://127.0.0.1:{oport}/cb", "thumbnails": specs}).encode()


def wait_callback(job_id, timeout=300):
    deadline = time.monotonic() + timeout
    with cond:
        while job_id not in callbacks:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            cond.wait(left)
        return callbacks[job_id]


def victim(p):
    """Submit a normal job (one 256 px thumbnail of a 1500x1000 PNG): seconds to its callback."""
    t0 = time.monotonic()
    st, body = p.req("POST", "/download", job("victim", [{"name": "t", "width": 256, "height": 256}],
                                              "/photo.png"), "application/json")
    if st != 201:
        return f"submit {st}"
    cb = wait_callback(json.loads(body)["id"])
    if cb is None:
        return "no callback in 300 s"
    ok = cb[1].get("success")
    return f"{cb[0] - t0:.2f} s" + ("" if ok else f" (failed: {cb[1].get('error')})")


def scenario(name, component, attack):
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"bench:abuse:{os.getpid()}:{len(rows)}"
        p = Proc(component, tmp, prefix)
        try:
            result, victim_latency = attack(p)
            rows.append((name, component, result, p.hwm(), p.idle_rss(), du(os.path.join(tmp, "files")),
                         victim_latency))
        finally:
            p.stop()
            if component == "web":
                subprocess.run(f"redis-cli --scan --pattern '{prefix}:*' | xargs -r redis-cli del",
                               shell=True, stdout=subprocess.DEVNULL)


def q(path):
    return lambda p: p.req("POST", path, TINY)


HUGE = "/thumbnail?width=10000&height=10000&enlarge=true&fit=fill&format=bmp"
for comp in ("web", "serve"):
    scenario("8 × 10000² bmp of a 69-byte PNG", comp,
             lambda p: (statuses(parallel(8, lambda i: p.req("POST", HUGE, TINY))), "-"))
scenario("20 × 7000² 16-bit RGBA PNG (381 KB)", "web",
         lambda p: (statuses(parallel(20, lambda i: p.req("POST", "/thumbnail?width=256&height=256", BIG))), "-"))
scenario("6 × iCCP bomb (2 MB → 2 GiB)", "web",
         lambda p: (statuses(parallel(6, lambda i: p.req("POST", "/thumbnail?width=64&height=64", BOMB))), "-"))

HUGE_SPECS = [{"name": f"t{i}", "width": 10000, "height": 10000, "enlarge": True, "fit": "fill", "format": "bmp"}
              for i in range(8)]
MAX_SPECS = [{"name": f"t{i}", "width": 4000, "height": 4000, "enlarge": True, "fit": "fill", "format": "bmp"}
             for i in range(8)]


def jobs_attack(specs, n):
    def run(p):
        subs = parallel(n, lambda i: p.req("POST", "/download", job(f"abuse{i}", specs), "application/json"))
        ids = [json.loads(b)["id"] for st, b in subs if st == 201]
        oks = [wait_callback(i) for i in ids]
        done = sum(1 for c in oks if c and c[1].get("success"))
        return f"submit {statuses(subs)}; {done} done", victim(p)
    return run


scenario("job with 8 × 10000² bmp specs", "serve", jobs_attack(HUGE_SPECS, 1))
scenario("3 jobs × 8 × 4000² bmp (allowed max)", "serve", jobs_attack(MAX_SPECS, 3))
scenario("victim alone (baseline)", "serve", lambda p: ("-", victim(p)))


def flood(p):
    res = {}

    def attack():
        res["r"] = parallel(30, lambda i: p.req("POST", "/thumbnail?width=256&height=256", BIG))

    t = threading.Thread(target=attack)
    t.start()
    # Let the flood fill the pool and the queue (bounded wait on the budget being used).
    time.sleep(1.0)
    v = victim(p)
    t.join(600)
    return statuses(res.get("r", [])), v


scenario("victim during 30 × POST /thumbnail 7000² PNG", "serve", flood)

print(f"\nallocator: {ALLOC}; thumbnail.max_memory_bytes = {budget // MiB} MiB (default: RAM/4, 256 MiB..1 GiB); "
      f"threads = {os.cpu_count()}\n")
print("| scenario | process | result | peak RSS (VmHWM) MiB | idle RSS after MiB | disk MB | victim thumbnail latency | within budget + 64 MiB |")
print("|---|---|---|---:|---:|---:|---|---|")
for name, comp, result, hwm, idle, disk, lat in rows:
    ok = "yes" if hwm <= budget + 64 * MiB else "NO"
    print(f"| {name} | {comp} | {result} | {hwm / MiB:.0f} | {idle / MiB:.0f} | {disk / 1e6:.1f} | {lat} | {ok} |")
origin.shutdown()
