#!/usr/bin/env python3
"""Driver for bench/thumbs: make the corpus, run each tool per class, measure, compare."""
import argparse, glob, os, re, shutil, subprocess, sys, time

import numpy as np
from PIL import Image

SIZE = 256
CLASSES = {
    # class: list of (name, width, height, kind)
    "jpeg": [(f"b{i}", w, h, "jpeg") for i, (w, h) in enumerate(
        [(1500, 1000), (2000, 1333), (1800, 2700), (3000, 2000), (3600, 2400), (4000, 3000),
         (3000, 4500), (6000, 4000)])],
    "jpeg-progressive": [(f"p{i}", w, h, "pjpeg") for i, (w, h) in enumerate(
        [(1500, 1000), (2000, 1333), (1800, 2700), (3000, 2000), (3600, 2400), (4000, 3000),
         (3000, 4500), (6000, 4000)])],
    "png": [(f"n{i}", w, h, k) for i, (w, h, k) in enumerate(
        [(1500, 1000, "png"), (2000, 1500, "png"), (1600, 1200, "pnga"), (2400, 1600, "png")])],
    "gif": [(f"g{i}", w, h, "gif") for i, (w, h) in enumerate(
        [(1000, 750), (1200, 800), (800, 1200), (1600, 1000)])],
    "tiff": [(f"t{i}", w, h, k) for i, (w, h, k) in enumerate(
        [(2000, 1333, "tiff_lzw"), (2000, 1333, "tiff_adobe_deflate"), (2400, 1600, "tiff_lzw"),
         (2400, 1600, "tiff_adobe_deflate")])],
    "bmp": [(f"m{i}", w, h, "bmp") for i, (w, h) in enumerate(
        [(2000, 1333), (2400, 1600), (1500, 1000), (1333, 2000)])],
}


def photo(w, h, seed):
    """Photo-like content: low-frequency colour fields, shapes with soft and hard edges,
    texture at several scales and sensor-like noise."""
    r = np.random.default_rng(seed)
    x = (np.arange(w, dtype=np.float32) / w)[None, :]
    y = (np.arange(h, dtype=np.float32) / h)[:, None]
    img = np.empty((h, w, 3), np.float32)
    for c in range(3):
        f = r.uniform(1, 6, 4)
        p = r.uniform(0, 6.3, 4)
        img[..., c] = (120 + 60 * np.sin(f[0] * x * 3 + p[0]) * np.cos(f[1] * y * 3 + p[1])
                       + 30 * np.sin(f[2] * (x + y) * 5 + p[2]))
    for _ in range(40):
        cx, cy = r.uniform(0, 1, 2)
        rad = r.uniform(0.02, 0.2)
        col = r.uniform(0, 255, 3).astype(np.float32)
        soft = r.uniform() < 0.5
        # Only the bounding box of the disc (in pixels) is touched.
        rp = rad * w
        x0, x1 = int(max(0, cx * w - rp - 2)), int(min(w, cx * w + rp + 2))
        y0, y1 = int(max(0, cy * h - rp - 2)), int(min(h, cy * h + rp + 2))
        if x1 <= x0 or y1 <= y0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        d = np.sqrt((xx - cx * w) ** 2 + (yy - cy * h) ** 2) / w
        a = np.clip((rad - d) / (0.01 if soft else 0.0015), 0, 1)[..., None]
        sub = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = sub * (1 - a * 0.8) + col * a * 0.8
    # multi-scale texture
    small = r.normal(0, 18, (h // 8 + 1, w // 8 + 1, 1)).astype(np.float32)
    img += np.repeat(np.repeat(small, 8, 0), 8, 1)[:h, :w]
    img += r.normal(0, 5, img.shape).astype(np.float32)
    return Image.frombytes("RGB", (w, h), np.clip(img, 0, 255).astype(np.uint8).tobytes())


def make_corpus(work):
    root = os.path.join(work, "corpus")
    seed = 0
    for cls, items in CLASSES.items():
        d = os.path.join(root, cls)
        os.makedirs(d, exist_ok=True)
        for name, w, h, kind in items:
            seed += 1
            ext = {"jpeg": "jpg", "pjpeg": "jpg", "png": "png", "pnga": "png", "gif": "gif",
                   "bmp": "bmp"}.get(kind, "tif")
            path = os.path.join(d, f"{name}.{ext}")
            if os.path.exists(path):
                continue
            im = photo(w, h, w * 7919 + h)
            if kind == "jpeg":
                im.save(path, quality=90)
            elif kind == "pjpeg":
                im.save(path, quality=90, progressive=True)
            elif kind == "png":
                im.save(path)
            elif kind == "pnga":
                a = Image.linear_gradient("L").resize((w, h))
                im.putalpha(a)
                im.save(path)
            elif kind == "gif":
                im.convert("P", palette=Image.Palette.ADAPTIVE).save(path)
            elif kind == "bmp":
                im.save(path)
            else:
                im.save(path, compression=kind)
    return root


PILLOW_SCRIPT = r"""
import os, sys
from PIL import Image
out = sys.argv[1]
for f in sys.argv[2:]:
    im = Image.open(f)
    if im.format == "JPEG":
        im.draft("RGB", (%d, %d))
    im = im.convert("RGBA") if "A" in im.getbands() or im.info.get("transparency") is not None else im.convert("RGB")
    im.thumbnail((%d, %d), Image.Resampling.LANCZOS)
    if im.mode == "RGBA":
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        im = bg
    stem = os.path.splitext(os.path.basename(f))[0]
    im.save(os.path.join(out, stem + ".jpg"), quality=85)
""" % (SIZE, SIZE, SIZE, SIZE)


def run_timed(cmd, env=None):
    """Run under taskset (one core) and /usr/bin/time -v; return (seconds, peak RSS MiB)."""
    full = ["taskset", "-c", "0", "/usr/bin/time", "-v"] + cmd
    t0 = time.perf_counter()
    p = subprocess.run(full, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-2000:] + p.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd[:3])}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    u = re.search(r"User time \(seconds\): ([\d.]+)", p.stderr)
    sy = re.search(r"System time \(seconds\): ([\d.]+)", p.stderr)
    cpu = float(u.group(1)) + float(sy.group(1)) if u and sy else float("nan")
    return dt, int(m.group(1)) / 1024 if m else float("nan"), cpu


def gaussian_kernel(sigma=1.5, radius=5):
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return k / k.sum()


def blur(a, k):
    a = np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 0, a)
    return np.apply_along_axis(lambda v: np.convolve(v, k, mode="valid"), 1, a)


def ssim(a, b):
    """SSIM on luma (Wang et al., Gaussian window sigma 1.5)."""
    a = np.asarray(a.convert("L"), np.float64)
    b = np.asarray(b.convert("L"), np.float64)
    k = gaussian_kernel()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = blur(a, k), blur(b, k)
    saa = blur(a * a, k) - mu_a ** 2
    sbb = blur(b * b, k) - mu_b ** 2
    sab = blur(a * b, k) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return float(s.mean())


def reference(path, size):
    im = Image.open(path)
    im = im.convert("RGBA") if "A" in im.getbands() or im.info.get("transparency") is not None else im.convert("RGB")
    if im.mode == "RGBA":
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        im = bg
    return im.resize(size, Image.Resampling.LANCZOS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    corpus = make_corpus(args.work)
    pillow_py = os.path.join(args.work, "pillow_thumbs.py")
    open(pillow_py, "w").write(PILLOW_SCRIPT)
    env1 = dict(os.environ, VIPS_CONCURRENCY="1", OMP_NUM_THREADS="1")
    tools = {
        "downloader": lambda out, files: [args.bin, "thumbnail", "--width", str(SIZE), "--height", str(SIZE),
                                          "--quality", "85", "--jobs", "1", "--output", out] + files,
        "vipsthumbnail": lambda out, files: ["vipsthumbnail", "--size", f"{SIZE}x{SIZE}",
                                             "-o", os.path.join(out, "%s.jpg[Q=85,strip]")] + files,
        "pillow": lambda out, files: [sys.executable, pillow_py, out] + files,
    }
    print(f"fit in {SIZE}x{SIZE}, JPEG q85, one core (taskset -c 0, VIPS_CONCURRENCY=1), "
          f"one process per class batch, best of {args.repeats}\n")
    refs = {}
    summary = []
    for cls in CLASSES:
        files = sorted(glob.glob(os.path.join(corpus, cls, "*")))
        results = {}
        for tool, cmd in tools.items():
            out = os.path.abspath(os.path.join(args.work, "out", cls, tool))
            best = None
            for _ in range(args.repeats):
                shutil.rmtree(out, ignore_errors=True)
                os.makedirs(out)
                dt, rss, cpu = run_timed(cmd(out, files), env=env1)
                if best is None or dt < best[0]:
                    best = (dt, rss, best[2] if best else cpu)
                best = (best[0], best[1], min(best[2], cpu))
            scores = []
            for f in files:
                stem = os.path.splitext(os.path.basename(f))[0]
                o = Image.open(os.path.join(out, stem + ".jpg")).convert("RGB")
                key = (f, o.size)
                if key not in refs:
                    refs[key] = reference(f, o.size)
                scores.append(ssim(o, refs[key]))
            results[tool] = (len(files) / best[0], best[1], float(np.mean(scores)), float(np.min(scores)),
                             len(files) / max(best[2], 1e-3))
        vips = results["vipsthumbnail"][0]
        vips_cpu = results["vipsthumbnail"][4]
        px = sum(w * h for _, w, h, _ in CLASSES[cls]) / len(CLASSES[cls]) / 1e6
        print(f"### {cls} ({len(files)} files, mean {px:.1f} MP)\n")
        print("| tool | images/s (wall) | vs libvips (wall) | images per CPU-s | vs libvips (CPU) "
              "| peak RSS MiB | SSIM mean | SSIM min |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for tool, (ips, rss, sm, smin, icpu) in results.items():
            print(f"| {tool} | {ips:.1f} | {ips / vips:.2f}x | {icpu:.1f} | {icpu / vips_cpu:.2f}x "
                  f"| {rss:.0f} | {sm:.4f} | {smin:.4f} |")
        print()
        summary.append((cls, results))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
