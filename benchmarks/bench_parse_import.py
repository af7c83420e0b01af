"""
Time and peak memory of `parse_tags.py import` (the authors' released tags joined with img2dataset
shards) on a synthetic CC12M-like set: an index of --urls URLs (1-8 tag indices each out of 10,000,
JSON as json.dump writes it), of which --found share were downloaded into img2dataset tars of 10,000
samples ({key}.jpg/.txt/.json), plus 5% downloaded samples whose URL is not in the index. Each
measurement runs in its own process so that its peak RSS (ru_maxrss) is its own; the RSS after the
imports (torch, numpy) is printed too, the difference being the import's own memory. With pyarrow
installed, the same shards are also read through img2dataset's parquet files.

Run:
    python benchmarks/bench_parse_import.py  # 1 M index URLs, 70% downloaded; 1 and 2 workers
    python benchmarks/bench_parse_import.py --urls 200000 --keep /tmp/import-bench
"""
import argparse
import importlib.util
import io
import json
import os
import random
import resource
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARD_SIZE = 10000


def make_data(folder, n_urls, found, seed=0):
    """object_list.csv, index.json and tars/{00000..}.tar (+ parquet/ with the same tars linked and
    a parquet per shard when pyarrow is installed)."""
    rng = random.Random(seed)
    with open(os.path.join(folder, "object_list.csv"), "w") as f:
        f.write("".join(f"tag{i}\n" for i in range(10000)))
    weights = [1 / (i + 1) for i in range(10000)]
    downloaded = []
    with open(os.path.join(folder, "index.json"), "w", encoding="utf-8") as f:
        f.write("{")
        block = 10000  # tags drawn in blocks: random.choices per URL would dominate the set-up time
        for start in range(0, n_urls, block):
            tags = rng.choices(range(10000), weights, k=8 * block)
            for j in range(min(block, n_urls - start)):
                i = start + j
                url = (f"https://img{i % 97}.example.com/photos/{i:08d}/"
                       f"{rng.getrandbits(48):012x}.jpg")
                f.write(("," if i else "") + json.dumps(url) + ":"
                        + json.dumps(tags[8 * j:8 * j + 1 + i % 8]))
                if rng.random() < found:
                    downloaded.append(url)
        f.write("}")
    extra = [f"https://other.example.org/{i}.jpg" for i in range(len(downloaded) // 20)]
    urls = downloaded + extra
    rng.shuffle(urls)
    os.makedirs(os.path.join(folder, "tars"))
    has_arrow = importlib.util.find_spec("pyarrow") is not None
    if has_arrow:
        import pyarrow as pa
        import pyarrow.parquet as pq
        os.makedirs(os.path.join(folder, "parquet"))
    image = b"\xff\xd8" + bytes(2000)  # a small stand-in: the import never reads it
    for s in range(0, len(urls), SHARD_SIZE):
        shard = f"{s // SHARD_SIZE:05d}"
        keys = [f"{shard}{i:04d}" for i in range(min(SHARD_SIZE, len(urls) - s))]
        path = os.path.join(folder, "tars", shard + ".tar")
        with tarfile.open(path, "w") as tar:
            for key, url in zip(keys, urls[s:]):
                meta = json.dumps({"url": url, "caption": "a caption", "key": key,
                                   "status": "success"}).encode()
                for ext, data in (("jpg", image), ("txt", b"a caption"), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        if has_arrow:
            os.symlink(path, os.path.join(folder, "parquet", shard + ".tar"))
            pq.write_table(pa.table({"url": urls[s:s + len(keys)], "key": keys,
                                     "status": ["success"] * len(keys)}),
                           os.path.join(folder, "parquet", shard + ".parquet"))
    return len(urls)


def stage(name, folder, shards, workers):
    """One measurement in this process, printed as JSON: seconds, peak RSS, RSS after the
    imports."""
    sys.path.insert(0, ROOT)
    import labels
    import import_tags
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    files = labels.input_files([os.path.join(folder, shards, "*.tar")])
    t0 = time.perf_counter()
    if name == "index":
        index = os.path.join(folder, "index.json")
        n = sum(len(import_tags.url_hash(url)) > 0 for url, _ in import_tags.read_url_index(index))
        result = {"index_urls": n}
    elif name == "shards":
        keys = import_tags.read_shard_urls(files, print, int(workers))[0]
        result = {"samples": len(keys)}
    else:
        result = import_tags.import_tags(os.path.join(folder, "object_list.csv"),
                                         os.path.join(folder, "index.json"), files,
                                         os.path.join(folder, "out-" + shards), print,
                                         workers=int(workers))
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "base_rss_mb": base, "result": result}))


def main():
    parser = argparse.ArgumentParser(
        description="parse_tags.py import: time and peak RSS on synthetic data")
    parser.add_argument("--urls", type=int, default=1_000_000, help="URLs in the synthetic index")
    parser.add_argument("--found", type=float, default=0.7,
                        help="share of the index URLs downloaded into shards")
    parser.add_argument("--keep", default=None,
                        help="make (or reuse) the data in this folder, not a temporary one")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="worker processes reading the tars")
    parser.add_argument("--stage", nargs=4, metavar=("NAME", "DIR", "SHARDS", "WORKERS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        return stage(*args.stage)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        t0 = time.perf_counter()
        if not os.path.isfile(os.path.join(folder, "index.json")):
            make_data(folder, args.urls, args.found)
        size = os.path.getsize(os.path.join(folder, "index.json"))
        n_tars = len(os.listdir(os.path.join(folder, "tars")))
        print(f"{args.urls:,} index URLs ({size / 1e6:.0f} MB), {n_tars} shards "
              f"(ready in {time.perf_counter() - t0:.0f} s)")
        runs = [("index", "tars", 1)] + [(name, "tars", w) for w in args.workers
                                         for name in ("shards", "import")]
        if os.path.isdir(os.path.join(folder, "parquet")):
            runs += [("shards", "parquet", 1), ("import", "parquet", 1)]
        for name, shards, workers in runs:
            r = subprocess.run(
                [sys.executable, __file__, "--stage", name, folder, shards, str(workers)],
                capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"{name} {shards} failed:\n{r.stderr}")
            m = json.loads(r.stdout.strip().splitlines()[-1])
            count = m["result"].get("index_urls", m["result"].get("samples"))
            print(f"{name:>6} ({shards:>7}, {workers} worker(s)): {m['seconds']:6.1f} s, "
                  f"{count / m['seconds']:9,.0f} /s "
                  f"({'index URLs' if name != 'shards' else 'samples'}), "
                  f"peak RSS {m['peak_rss_mb']:5.0f} MB "
                  f"(after imports {m['base_rss_mb']:4.0f} MB)  {json.dumps(m['result'])[:300]}")


if __name__ == "__main__":
    main()
