"""
Time and peak memory of `parse_tags.py merge` and `vocab` on synthetic records (CC12M-like: 9-digit
keys spread over shards, a few object and attribute tags each from a Zipf-like vocabulary, 1%
failures), the streaming code vs the in-memory code (parse_tags.py at commit BASELINE, read with
`git show`). Each stage runs in its own process so that its peak RSS (ru_maxrss) is its own.

Run:
    python benchmarks/bench_parse_merge.py          # 3 M records, 8 shards, both implementations
    python benchmarks/bench_parse_merge.py --records 1000000 --skip-old
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINE = "25d2490"  # a commit whose parse_tags.py merges and builds the vocab in memory


def make_records(folder, n, shards, seed=0):
    """n synthetic records in parsed.{i}-of-{shards}.jsonl, keys interleaved over the shards as
    by-row sharding would leave them (so the merge has to interleave them back)."""
    rng = random.Random(seed)
    objects = [f"object{i}" for i in range(20000)]
    attributes = [f"attr{i}" for i in range(5000)]
    weights_o = [1 / (i + 1) for i in range(len(objects))]
    weights_a = [1 / (i + 1) for i in range(len(attributes))]
    files = [open(os.path.join(folder, f"parsed.{i}-of-{shards}.jsonl"), "w", encoding="utf-8")
             for i in range(shards)]
    block = 10000  # draw tags in blocks: random.choices per record would dominate the set-up time
    for start in range(0, n, block):
        m = min(block, n - start)
        objs = rng.choices(objects, weights_o, k=4 * m)
        attrs = rng.choices(attributes, weights_a, k=2 * m)
        for j in range(m):
            i = start + j
            rec = {"key": f"{i:09d}", "h": f"{rng.getrandbits(64):016x}"}
            if i % 100 == 7:
                rec.update(error="after retry: not 'objects | attributes'", raw="cat, dog")
            else:
                rec.update(objects=objs[4 * j:4 * j + 1 + i % 4],
                           attributes=attrs[2 * j:2 * j + i % 3])
            files[i % shards].write(json.dumps(rec, ensure_ascii=False) + "\n")
    for f in files:
        f.close()


def stage(impl, name, folder):
    """Run one stage in this process and print its time and peak RSS as JSON."""
    if impl == "old":
        import importlib.util
        spec = importlib.util.spec_from_file_location(
            "parse_tags_old", os.path.join(folder, "..", "parse_tags_old.py"))
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, ROOT)
        spec.loader.exec_module(module)
    else:
        sys.path.insert(0, ROOT)
        import parse_tags as module
    t0 = time.perf_counter()
    result = module.merge(folder) if name == "merge" else module.build_vocab(folder)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "result": result}))


def main():
    parser = argparse.ArgumentParser(
        description="merge/vocab time and peak RSS, streaming vs in-memory")
    parser.add_argument("--records", type=int, default=3_000_000, help="synthetic records")
    parser.add_argument("--shards", type=int, default=8, help="parsed.{i}-of-{n}.jsonl files")
    parser.add_argument("--skip-old", action="store_true", help="measure only the streaming code")
    parser.add_argument("--stage", nargs=3, metavar=("IMPL", "NAME", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        return stage(*args.stage)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        impls = ["new"] if args.skip_old else ["old", "new"]
        if "old" in impls:
            source = subprocess.run(["git", "-C", ROOT, "show", f"{BASELINE}:parse_tags.py"],
                                    capture_output=True, text=True, check=True).stdout
            with open(os.path.join(tmp, "parse_tags_old.py"), "w") as f:
                f.write(source)
        for impl in impls:
            os.makedirs(os.path.join(tmp, impl))
            make_records(os.path.join(tmp, impl), args.records, args.shards)
        size = sum(os.path.getsize(os.path.join(tmp, "new", f))
                   for f in os.listdir(os.path.join(tmp, "new")))
        print(f"{args.records:,} synthetic records in {args.shards} shards, {size / 1e6:.0f} MB "
              f"(made in {time.perf_counter() - t0:.0f} s)")
        outputs = {}
        for impl in impls:
            for name in ("merge", "vocab"):
                r = subprocess.run(
                    [sys.executable, __file__, "--stage", impl, name, os.path.join(tmp, impl)],
                    capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"{impl} {name} failed:\n{r.stderr}")
                m = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"{impl:>3} {name:<5}: {m['seconds']:7.1f} s, "
                      f"{m['seconds'] / args.records * 1e6:5.1f} us/record, "
                      f"peak RSS {m['peak_rss_mb']:7.0f} MB  {m['result']}")
            with open(os.path.join(tmp, impl, "parsed.jsonl"), "rb") as f:
                outputs[impl] = (f.read(), json.load(open(os.path.join(tmp, impl, "vocab.json"))))
        if len(outputs) == 2:
            print(f"identical parsed.jsonl: {outputs['old'][0] == outputs['new'][0]}; "
                  f"identical vocab.json: {outputs['old'][1] == outputs['new'][1]}")


if __name__ == "__main__":
    main()
