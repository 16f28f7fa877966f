#!/usr/bin/env python3
"""Callback receivers for bench/callbacks-fair; prints one JSON line.

  callbacks_fair.py --api URL --metrics URL [--redis-port P] [--share K]
                    [--tarpit N] [--slow N] [--failing N] [--healthy N] [--rate R]
                    [--deadline S] [--quiet S]

Starts on loopback an origin (one small file), and four callback receivers: a tarpit
(accepts, reads, never answers), a slow one (200 after 2 s), a failing one (500 at
once) and a healthy one (200 at once, noting when each job's callback arrived). It
submits N callbacks to each bad receiver, waits until the tarpit holds K connections
(its share), then submits --healthy jobs to the healthy receiver at --rate per second
and waits for their callbacks (--deadline s after the last submit at most). Then, with
only the bad receivers' backlog left, it counts for --quiet s the notifier's deferrals
(`downloader_callbacks_deferred_total` at --metrics) and, with --redis-port, the Redis
server's script calls (store steps), which it also counts for --quiet/2 s before the
backlog is submitted. Latencies: from the submit, and from the download's end
(`finished_at` of GET /jobs/{id}) to the callback's arrival. Every socket operation
has a timeout.
"""
import argparse
import asyncio
import json
import time

TIMEOUT = 10.0


class Counter:
    def __init__(self):
        self.now = 0
        self.max = 0
        self.total = 0
        self.done_at = []

    def enter(self):
        self.now += 1
        self.total += 1
        self.max = max(self.max, self.now)

    def leave(self):
        self.now -= 1
        self.done_at.append(time.time())


async def read_request(reader):
    """(head, body) of one request, or None at EOF."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 300)
    except Exception:
        return None
    length = 0
    for line in head.decode("latin-1").split("\r\n")[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    body = await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
    return head, body


def response(status, body=b""):
    reason = {200: "OK", 500: "Internal Server Error"}[status]
    return (b"HTTP/1.1 %d %s\r\nContent-Length: %d\r\nContent-Type: text/plain\r\n\r\n"
            % (status, reason.encode(), len(body))) + body


async def serve(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def receiver(kind, counter, arrivals):
    """Counts requests in flight (for the tarpit: its connections, each one request)."""
    async def handle(reader, writer):
        try:
            if kind == "tarpit":
                counter.enter()
                try:
                    # Reads until the client gives up; never answers.
                    while await asyncio.wait_for(reader.read(65536), 600):
                        pass
                finally:
                    counter.leave()
                return
            while True:
                req = await read_request(reader)
                if req is None:
                    return
                counter.enter()
                try:
                    if kind == "slow":
                        await asyncio.sleep(2)
                        writer.write(response(200))
                    elif kind == "failing":
                        writer.write(response(500, b"no"))
                    else:
                        arrivals[json.loads(req[1])["job_id"]] = time.time()
                        writer.write(response(200))
                finally:
                    counter.leave()
                await asyncio.wait_for(writer.drain(), TIMEOUT)
        except (Exception, asyncio.CancelledError):
            pass
        finally:
            writer.close()
    return handle


async def origin(reader, writer):
    try:
        while await read_request(reader) is not None:
            writer.write(response(200, b"a file to call back about"))
            await asyncio.wait_for(writer.drain(), TIMEOUT)
    except (Exception, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def http(method, url, body=None):
    """(status, body) of one request on a new connection."""
    assert url.startswith("http://")
    hostport, _, path = url[7:].partition("/")
    host, port = hostport.split(":")
    r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), TIMEOUT)
    try:
        data = b"" if body is None else json.dumps(body).encode()
        w.write((f"{method} /{path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")
                .encode() + data)
        await asyncio.wait_for(w.drain(), TIMEOUT)
        raw = await asyncio.wait_for(r.read(), TIMEOUT)
    finally:
        w.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


async def submit(api, origin_port, n, callback):
    status, body = await http("POST", f"{api}/download", {
        "aggr_id": "bench-fair", "aggr_limit": 50,
        "url": f"http://127.0.0.1:{origin_port}/f?{n}", "callback_url": callback})
    assert status == 201, (status, body)
    return json.loads(body)["id"]


async def deferrals(metrics):
    status, body = await http("GET", metrics)
    assert status == 200, status
    for line in body.decode().splitlines():
        if line.startswith("downloader_callbacks_deferred_total "):
            return float(line.split()[1])
    return 0.0


async def redis_scripts(port):
    """Script calls (EVALSHA: one per store step) the Redis server has run."""
    if not port:
        return None
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    try:
        w.write(b"INFO commandstats\r\n")
        await asyncio.wait_for(w.drain(), TIMEOUT)
        head = await asyncio.wait_for(r.readline(), TIMEOUT)
        text = await asyncio.wait_for(r.readexactly(int(head[1:]) + 2), TIMEOUT)
    finally:
        w.close()
    calls = 0
    for line in text.decode().splitlines():
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
            calls += int(line.split("calls=")[1].split(",")[0])
    return calls


async def rates(a, secs):
    """Deferrals/s and Redis script calls/s over the next `secs` seconds."""
    d0, r0, t0 = await deferrals(a.metrics), await redis_scripts(a.redis_port), time.time()
    await asyncio.sleep(secs)
    d1, r1, t1 = await deferrals(a.metrics), await redis_scripts(a.redis_port), time.time()
    return (round((d1 - d0) / (t1 - t0), 2),
            None if r0 is None else round((r1 - r0) / (t1 - t0), 1))


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None


def ms(x):
    return None if x is None else round(x * 1000, 1)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--api", required=True)
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--redis-port", type=int, default=0)
    ap.add_argument("--share", type=int, default=4)
    ap.add_argument("--tarpit", type=int, default=20)
    ap.add_argument("--slow", type=int, default=20)
    ap.add_argument("--failing", type=int, default=20)
    ap.add_argument("--healthy", type=int, default=200)
    ap.add_argument("--rate", type=float, default=20)
    ap.add_argument("--deadline", type=float, default=15)
    ap.add_argument("--quiet", type=float, default=20)
    a = ap.parse_args()

    counters = {k: Counter() for k in ("tarpit", "slow", "failing", "healthy")}
    arrivals = {}
    ports = {}
    servers = []
    for kind, c in counters.items():
        s, ports[kind] = await serve(receiver(kind, c, arrivals))
        servers.append(s)
    s, origin_port = await serve(origin)
    servers.append(s)
    url = {k: f"http://127.0.0.1:{p}/cb" for k, p in ports.items()}

    # Warm-up: one healthy callback end to end.
    warm = await submit(a.api, origin_port, "warm", url["healthy"])
    t = time.time()
    while warm not in arrivals:
        assert time.time() - t < 30, "warm-up callback did not arrive"
        await asyncio.sleep(0.02)

    _, idle_scripts = await rates(a, a.quiet / 2)
    n = 0
    bad_at = time.time()
    for kind in ("tarpit", "slow", "failing"):
        for _ in range(getattr(a, kind)):
            n += 1
            await submit(a.api, origin_port, n, url[kind])
    t = time.time()
    while counters["tarpit"].now < min(a.share, a.tarpit):
        assert time.time() - t < 30, f"tarpit holds {counters['tarpit'].now} connections"
        await asyncio.sleep(0.02)

    submitted = {}
    start = time.time()
    for i in range(a.healthy):
        due = start + i / a.rate
        await asyncio.sleep(max(0, due - time.time()))
        submitted[await submit(a.api, origin_port, f"h{i}", url["healthy"])] = time.time()
    last = time.time()
    while len([j for j in submitted if j in arrivals]) < len(submitted) \
            and time.time() - last < a.deadline:
        await asyncio.sleep(0.05)
    got = {j: arrivals[j] for j in submitted if j in arrivals}
    from_submit = [got[j] - submitted[j] for j in got]
    from_finish = []
    for j in got:
        status, body = await http("GET", f"{a.api}/jobs/{j}")
        if status == 200:
            from_finish.append(got[j] - json.loads(body)["finished_at"] / 1000)
    tarpit_during = counters["tarpit"].now

    deferrals_per_s, scripts_per_s = await rates(a, a.quiet)
    for s in servers:
        s.close()
    print(json.dumps({
        "healthy": len(submitted), "delivered": len(got),
        "submit_p50_ms": ms(pct(from_submit, 50)), "submit_p99_ms": ms(pct(from_submit, 99)),
        "submit_max_ms": ms(max(from_submit, default=None)),
        "finish_p50_ms": ms(pct(from_finish, 50)), "finish_p99_ms": ms(pct(from_finish, 99)),
        "finish_max_ms": ms(max(from_finish, default=None)),
        "tarpit_open": tarpit_during, "tarpit_max": counters["tarpit"].max,
        "tarpit_accepted": counters["tarpit"].total,
        "slow_max": counters["slow"].max, "slow_done": len(counters["slow"].done_at),
        "slow_drained_s": round(max(counters["slow"].done_at) - bad_at, 1)
        if len(counters["slow"].done_at) >= a.slow > 0 else None,
        "failing_total": counters["failing"].total,
        "deferrals_per_s": deferrals_per_s,
        "redis_scripts_idle_per_s": idle_scripts, "redis_scripts_per_s": scripts_per_s,
    }))


if __name__ == "__main__":
    asyncio.run(main())
