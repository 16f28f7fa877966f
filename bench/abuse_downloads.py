#!/usr/bin/env python3
"""Greedy clients against stalling origins, for bench/abuse-downloads; prints one JSON line.

  abuse_downloads.py API_PORT PIDS REDIS JOBS [GREEDY_TOKEN VICTIM_TOKEN]

API_PORT  the service's `POST /download` port
PIDS      comma-separated pids whose CPU time and peak RSS (VmHWM) are reported
REDIS     host:port of the (private) Redis the service uses, or `none`
JOBS      greedy jobs to submit
TOKENS    with them, the greedy jobs are one tenant's, spread over 100 aggregations,
          and the victim is another tenant's; without, one aggregation and another

It runs its own origins and callback receiver on loopback:
- a stalling origin: reads the request, sends a 200 header promising 1 MB and three
  bytes, then nothing, until the client gives up;
- a healthy origin (4 KiB files) and a callback receiver.

Then: the victim's latency (submit -> callback) with nothing else going on; a job
asking for download_timeout = u64::MAX; JOBS greedy jobs of one aggregation (or
tenant) to the stalling origin; once the downloads it holds stop growing, a
10-second window in which the victim is timed five times and the store's commands
(Redis INFO) and the processes' CPU time are counted; then how long the stalled
downloads were held before the processor cut them. Every socket operation has a
timeout.
"""
import asyncio
import json
import os
import statistics
import sys
import time

TIMEOUT = 30.0
CUT_DEADLINE = 180.0
HZ = os.sysconf("SC_CLK_TCK")


class Stalls:
    def __init__(self):
        self.open = 0
        self.most = 0
        self.held = []  # seconds each closed connection was held

    async def handle(self, r, w):
        try:
            await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), TIMEOUT)
        except Exception:
            w.close()
            return
        t = time.monotonic()
        self.open += 1
        self.most = max(self.most, self.open)
        try:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"
                    b"Content-Length: 1000000\r\n\r\n\xff\xd8\xff")
            await w.drain()
            # Until the client gives up; bounded by the bench's own deadline.
            while await asyncio.wait_for(r.read(4096), CUT_DEADLINE + 60):
                pass
        except (Exception, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            self.held.append(time.monotonic() - t)
            w.close()


async def healthy(r, w):
    body = b"\xff\xd8\xff" + b"x" * 4093
    try:
        while True:
            await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), TIMEOUT)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                    % len(body) + body)
            await asyncio.wait_for(w.drain(), TIMEOUT)
    except Exception:
        w.close()


class Callbacks:
    def __init__(self):
        self.seen = {}  # job id -> (monotonic time, callback)
        self.waiters = {}

    async def handle(self, r, w):
        try:
            while True:
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), TIMEOUT)
                n = 0
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    if line.lower().startswith("content-length:"):
                        n = int(line.split(":", 1)[1])
                body = await asyncio.wait_for(r.readexactly(n), TIMEOUT)
                cb = json.loads(body)
                self.seen[cb["job_id"]] = (time.monotonic(), cb)
                ev = self.waiters.pop(cb["job_id"], None)
                if ev:
                    ev.set()
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await asyncio.wait_for(w.drain(), TIMEOUT)
        except Exception:
            w.close()

    async def wait(self, job_id, timeout):
        if job_id not in self.seen:
            ev = self.waiters.setdefault(job_id, asyncio.Event())
            try:
                await asyncio.wait_for(ev.wait(), timeout)
            except asyncio.TimeoutError:
                return None
        return self.seen[job_id]


async def post(port, path, body, token=None):
    """Status and JSON body of one request on a new connection."""
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    try:
        data = json.dumps(body).encode()
        auth = b"Authorization: Bearer %s\r\n" % token.encode() if token else b""
        w.write(b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % (path.encode(), auth, len(data)) + data)
        await asyncio.wait_for(w.drain(), TIMEOUT)
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), TIMEOUT)
        status = int(head.split()[1])
        n = 0
        for line in head.decode("latin-1").split("\r\n")[1:]:
            if line.lower().startswith("content-length:"):
                n = int(line.split(":", 1)[1])
        rest = await asyncio.wait_for(r.readexactly(n), TIMEOUT)
        try:
            return status, json.loads(rest)
        except ValueError:
            return status, rest.decode("utf-8", "replace")
    finally:
        w.close()


def cpu_seconds(pids):
    total = 0
    for p in pids:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / HZ


def hwm_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def redis_counts(addr):
    """(commands run, scripts run, BLPOPs) since the server started: a script's own
    commands are counted in the first."""
    host, port = addr.rsplit(":", 1)
    r, w = await asyncio.wait_for(asyncio.open_connection(host, int(port)), TIMEOUT)
    try:
        w.write(b"INFO all\r\n")
        await w.drain()
        head = await asyncio.wait_for(r.readline(), TIMEOUT)
        body = await asyncio.wait_for(r.readexactly(int(head[1:]) + 2), TIMEOUT)
    finally:
        w.close()
    info = {}
    for line in body.decode().split("\r\n"):
        k, _, v = line.partition(":")
        info[k] = v

    def calls(cmd):
        v = info.get(f"cmdstat_{cmd}", "")
        for part in v.split(","):
            if part.startswith("calls="):
                return int(part[6:])
        return 0
    return (int(info.get("total_commands_processed", 0)), calls("evalsha") + calls("eval"),
            calls("blpop"))


def quiet_cancellations(loop, ctx):
    """Connection handlers still waiting when the bench ends are cancelled: not errors."""
    if isinstance(ctx.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(ctx)


async def main():
    asyncio.get_running_loop().set_exception_handler(quiet_cancellations)
    port, pids, redis = int(sys.argv[1]), [int(p) for p in sys.argv[2].split(",")], sys.argv[3]
    jobs = int(sys.argv[4])
    greedy_token, victim_token = (sys.argv[5], sys.argv[6]) if len(sys.argv) > 6 else (None, None)
    stalls, cbs = Stalls(), Callbacks()
    s_srv = await asyncio.start_server(stalls.handle, "127.0.0.1", 0, backlog=4096)
    h_srv = await asyncio.start_server(healthy, "127.0.0.1", 0, backlog=1024)
    c_srv = await asyncio.start_server(cbs.handle, "127.0.0.1", 0, backlog=4096)
    s_port, h_port, c_port = (srv.sockets[0].getsockname()[1] for srv in (s_srv, h_srv, c_srv))
    cb_url = f"http://127.0.0.1:{c_port}/cb"

    n_victims = 0

    async def victim():
        nonlocal n_victims
        n_victims += 1
        job = {"aggr_id": "victim", "aggr_limit": 10, "callback_url": cb_url,
               "url": f"http://127.0.0.1:{h_port}/v{n_victims}"}
        t = time.monotonic()
        status, body = await post(port, "/download", job, victim_token)
        if status != 201:
            return f"submit {status}"
        got = await cbs.wait(body["id"], 120)
        if got is None:
            return None  # no callback in 120 s
        return (got[0] - t) * 1000 if got[1]["success"] else f"failed: {got[1]['error']}"

    def ms(times):
        ok = [t for t in times if isinstance(t, float)]
        if len(ok) < len(times):
            return f"{len(times) - len(ok)} of {len(times)} not done in 120 s ({times})"
        return f"{statistics.median(ok):.0f} / {max(ok):.0f} ms"

    out = {"baseline": ms([await victim() for _ in range(5)])}

    hostile = {"aggr_id": "greedy", "aggr_limit": 5000, "callback_url": cb_url,
               "url": f"http://127.0.0.1:{s_port}/x", "download_timeout": 18446744073709551615}
    st, body = await post(port, "/download", hostile, greedy_token)
    out["download_timeout_u64_max"] = f"{st} {body.get('error', '') if isinstance(body, dict) else body}"

    sem = asyncio.Semaphore(64)

    async def greedy(i):
        aggr = f"greedy-{i % 100}" if greedy_token else "greedy"
        job = {"aggr_id": aggr, "aggr_limit": 5000, "callback_url": cb_url,
               "url": f"http://127.0.0.1:{s_port}/g{i}"}
        async with sem:
            return (await post(port, "/download", job, greedy_token))[0]

    t_attack = time.monotonic()
    statuses = await asyncio.gather(*(greedy(i) for i in range(jobs)), return_exceptions=True)
    out["greedy_accepted"] = sum(1 for s in statuses if s == 201)
    # Until the downloads held stop growing (unchanged for 3 s), at most 60 s.
    last, since = -1, time.monotonic()
    while time.monotonic() - t_attack < 60:
        if stalls.open != last:
            last, since = stalls.open, time.monotonic()
        elif time.monotonic() - since >= 3:
            break
        await asyncio.sleep(0.1)
    out["slots_held"] = stalls.open

    # The measured window: 10 s, the victim five times in it.
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    ops0 = await redis_counts(redis) if redis != "none" else None
    times = []
    for _ in range(5):
        times.append(await victim())
        await asyncio.sleep(max(0.0, t0 + 2 * len(times) - time.monotonic()))
    ops1 = await redis_counts(redis) if redis != "none" else None
    cpu1, t1 = cpu_seconds(pids), time.monotonic()
    out["victim_during"] = ms(times)
    out["window_s"] = round(t1 - t0, 1)
    out["cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
    if ops0 is not None:
        per_s = [round((b - a) / (t1 - t0)) for a, b in zip(ops0, ops1)]
        out["store_ops_s"] = f"{per_s[1]} scripts + {per_s[2]} BLPOP ({per_s[0]} commands)"
    else:
        out["store_ops_s"] = None
    out["most_held"] = stalls.most

    # How long the processor held a stalled download before cutting it.
    deadline = time.monotonic() + CUT_DEADLINE
    while not stalls.held and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    out["stall_cut_s"] = round(statistics.median(stalls.held), 1) if stalls.held else None
    out["peak_rss_mib"] = [round(hwm_mib(p)) for p in pids]
    for srv in (s_srv, h_srv, c_srv):
        srv.close()
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
