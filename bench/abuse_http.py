#!/usr/bin/env python3
"""Hostile HTTP clients for bench/abuse-http; prints one JSON line per scenario.

  abuse_http.py bodies  PORT N SIZE      N concurrent POST /thumbnail bodies of SIZE bytes
  abuse_http.py trickle PORT SIZE GAP    SIZE-1000 bytes at once, then 1 byte every GAP s
  abuse_http.py idle    PORT N           N idle connections held open

While the abuse runs, a victim (POST /download, or GET /hb for `idle`) is timed on a
new connection every 100 ms; its worst and median latency are reported. Every socket
operation has a timeout.
"""
import asyncio
import json
import statistics
import sys
import time

TIMEOUT = 30.0
JOB = json.dumps({"aggr_id": "bench-abuse", "aggr_limit": 1,
                  "url": "http://127.0.0.1:9/f", "callback_url": "http://127.0.0.1:9/cb"})


async def read_response(reader, timeout=TIMEOUT):
    """Status and body of one response (Content-Length framed), or (0, error)."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except Exception as e:  # reset, EOF, timeout
        return 0, type(e).__name__
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for l in lines[1:]:
        if l.lower().startswith("content-length:"):
            length = int(l.split(":", 1)[1])
    try:
        body = await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
    except Exception as e:
        return status, type(e).__name__
    return status, body.decode("utf-8", "replace")


async def request(port, raw):
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    try:
        w.write(raw)
        await asyncio.wait_for(w.drain(), TIMEOUT)
        return await read_response(r)
    finally:
        w.close()


def victim_request(kind):
    if kind == "hb":
        return b"GET /hb HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    body = JOB.encode()
    return (b"POST /download HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body


async def victim(port, kind, stop):
    """Times the victim request every 100 ms until `stop` is set."""
    times, statuses = [], {}
    raw = victim_request(kind)
    while not stop.is_set():
        t = time.monotonic()
        try:
            status, _ = await request(port, raw)
        except Exception as e:
            status = type(e).__name__
        times.append((time.monotonic() - t) * 1000)
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except asyncio.TimeoutError:
            pass
    return {"victim": kind, "victim_max_ms": round(max(times), 1),
            "victim_p50_ms": round(statistics.median(times), 1), "victim_statuses": statuses}


async def one_body(port, size):
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    try:
        w.write(b"POST /thumbnail?width=64&height=64 HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % size)
        await asyncio.wait_for(w.drain(), TIMEOUT)
        # Send the body while watching for an early answer (a refusal).
        answer = asyncio.ensure_future(read_response(r))
        chunk = b"\0" * (1 << 20)
        sent = 0
        while sent < size and not answer.done():
            n = min(len(chunk), size - sent)
            w.write(chunk[:n])
            try:
                await asyncio.wait_for(w.drain(), TIMEOUT)
            except Exception:
                break
            sent += n
        status, _ = await answer
        return status
    finally:
        w.close()


async def bodies(port, n, size):
    stop = asyncio.Event()
    v = asyncio.ensure_future(victim(port, "download", stop))
    t = time.monotonic()
    statuses = await asyncio.gather(*(one_body(port, size) for _ in range(n)), return_exceptions=True)
    took = time.monotonic() - t
    stop.set()
    out = {"statuses": {}, "seconds": round(took, 1)}
    for s in statuses:
        k = str(s if not isinstance(s, Exception) else type(s).__name__)
        out["statuses"][k] = out["statuses"].get(k, 0) + 1
    out.update(await v)
    return out


async def trickle(port, size, gap):
    stop = asyncio.Event()
    v = asyncio.ensure_future(victim(port, "download", stop))
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT)
    t = time.monotonic()
    w.write(b"POST /thumbnail?width=64&height=64 HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % size)
    # 1000 bytes short: dripped one at a time, the body would take 1000 gaps.
    w.write(b"\0" * (size - 1000))
    await asyncio.wait_for(w.drain(), TIMEOUT)
    # The server answers when it gives up on the body: wait for longer than it may.
    answer = asyncio.ensure_future(read_response(r, 600))

    async def drip():
        while True:
            await asyncio.sleep(gap)
            w.write(b"\0")
            await asyncio.wait_for(w.drain(), TIMEOUT)

    d = asyncio.ensure_future(drip())
    # The answer comes when the server gives up (or the body completes).
    done, _ = await asyncio.wait([answer], timeout=600)
    held = time.monotonic() - t
    d.cancel()
    w.close()
    stop.set()
    status = answer.result()[0] if done else "still open after 600 s"
    out = {"statuses": {str(status): 1}, "held_seconds": round(held, 1)}
    out.update(await v)
    return out


async def idle(port, n):
    conns = []
    for _ in range(n):
        try:
            conns.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), TIMEOUT))
        except Exception:
            break
    stop = asyncio.Event()
    v = asyncio.ensure_future(victim(port, "hb", stop))
    await asyncio.sleep(3)
    stop.set()
    out = {"opened": len(conns)}
    out.update(await v)
    # How many of ours the server closed to make room.
    closed = 0
    for r, w in conns:
        try:
            data = await asyncio.wait_for(r.read(1), 0.01)
            closed += data == b""
        except asyncio.TimeoutError:
            pass
        except Exception:
            closed += 1
        w.close()
    out["closed_by_server"] = closed
    return out


def main():
    cmd, port = sys.argv[1], int(sys.argv[2])
    if cmd == "bodies":
        out = asyncio.run(bodies(port, int(sys.argv[3]), int(sys.argv[4])))
    elif cmd == "trickle":
        out = asyncio.run(trickle(port, int(sys.argv[3]), float(sys.argv[4])))
    elif cmd == "idle":
        out = asyncio.run(idle(port, int(sys.argv[3])))
    else:
        sys.exit(f"unknown scenario {cmd}")
    got = ", ".join(f"{v}x {k}" for k, v in sorted(out.get("statuses", {}).items()))
    if "held_seconds" in out:
        got += f", held {out['held_seconds']} s"
    if "opened" in out:
        got = f"{out['opened']} opened, {out['closed_by_server']} closed by the server"
    statuses = ", ".join(f"{v}x {k}" for k, v in sorted(out["victim_statuses"].items()))
    out["got"] = got
    out["victim_text"] = (f"{out['victim']}: max {out['victim_max_ms']} / p50 "
                          f"{out['victim_p50_ms']} ms ({statuses})")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
