"""
Memory of `parse_tags.py parse` as records pile up: the resume and dedupe state of parse_captions
(CompactMap) against the dict-and-set state (parse_tags.py at commit BASELINE, read with
`git show`), on the same synthetic CC12M-like captions (9-digit keys, ~90 characters, 10% repeated)
and an instant stand-in for the LLM, so that only the bookkeeping is measured. Each run is its own
process; RSS is read from /proc at checkpoints while the input is consumed, and the slope (bytes per
record) is fitted over them. Then a resume over the full file (every key done) gives its peak RSS.

Use 500,000 records or more: each map keeps its newest 65,536 entries in a dict (~100 bytes
each) before folding them into its arrays, so a shorter run measures mostly the dicts.

Run:
    python benchmarks/bench_parse_memory.py                    # 1 M records, both implementations
    python benchmarks/bench_parse_memory.py --records 500000 --skip-old
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
BASELINE = "a6ebcc7"  # a commit whose parse_tags.py keeps the resume state in a set and a dict

WORDS = ("dog cat man woman child car bus tree house street beach table chair red blue green old "
         "small large wooden standing sitting near under front view photo city park river "
         "mountain sky").split()


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def captions(n, seed=0):
    """n (key, caption) pairs; one caption in ten repeats an earlier one (CC12M has many exact
    repeats). Caption j is made again from its own seed when repeated, so the generator holds no
    captions (its memory would count as the parser's)."""
    rng = random.Random(seed)
    made = lambda j: " ".join(random.Random(seed * 1_000_003 + j).choices(WORDS, k=14)) + f" {j}"
    for i in range(n):
        j = rng.randrange(i) if i and rng.random() < 0.1 else i
        yield f"{i:09d}", made(j)


def answer(text, strict=False):
    """An instant LLM: three of the caption's words as objects, one as an attribute (a ~40-byte
    answer)."""
    words = text.split()
    return f"{words[0]}, {words[1]}, {words[2]} | red"


def run(impl, folder, n):
    """Parse n captions into folder in this process; print RSS at each checkpoint and the total time
    as JSON."""
    sys.path.insert(0, ROOT)
    if impl == "old":
        import importlib.util
        spec = importlib.util.spec_from_file_location("parse_tags_old",
                                                      os.path.join(folder, "..", "old.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        import parse_tags as module
    marks, checkpoints = {}, {n * k // 8 for k in range(2, 9)}

    def counted():
        for i, sample in enumerate(captions(n), 1):
            yield sample
            if i in checkpoints:
                marks[i] = rss_mb()

    start = rss_mb()
    t0 = time.perf_counter()
    stats = module.parse_captions(counted(), answer, folder, progress=False)
    print(json.dumps({"seconds": time.perf_counter() - t0, "start_mb": start, "marks": marks,
                      "stats": stats,
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def slope(marks):
    """Least-squares bytes per record over the checkpoints."""
    xs, ys = [int(k) for k in marks], [v * 2 ** 20 for v in marks.values()]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main():
    parser = argparse.ArgumentParser(
        description="parse_captions memory per record, compact vs dict state")
    parser.add_argument("--records", type=int, default=1_000_000,
                        help="synthetic captions to parse")
    parser.add_argument("--skip-old", action="store_true", help="measure only today's code")
    parser.add_argument("--run", nargs=3, metavar=("IMPL", "DIR", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.records
    if args.run:
        return run(args.run[0], args.run[1], int(args.run[2]))

    impls = ["new"] if args.skip_old else ["old", "new"]
    with tempfile.TemporaryDirectory() as tmp:
        if "old" in impls:
            source = subprocess.run(["git", "-C", ROOT, "show", f"{BASELINE}:parse_tags.py"],
                                    capture_output=True, text=True, check=True).stdout
            with open(os.path.join(tmp, "old.py"), "w") as f:
                f.write(source)
        print(f"{n:,} synthetic captions, instant stand-in LLM; RSS in MB")
        files = {}
        for impl in impls:
            folder = os.path.join(tmp, impl)
            os.makedirs(folder)
            for phase in ("parse", "resume"):
                r = subprocess.run([sys.executable, __file__, "--run", impl, folder, str(n)],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"{impl} {phase} failed:\n{r.stderr}")
                m = json.loads(r.stdout.strip().splitlines()[-1])
                line = (f"{impl:>3} {phase:<6}: {m['seconds']:6.1f} s, start {m['start_mb']:5.0f}, "
                        f"peak {m['peak_mb']:5.0f}")
                if phase == "parse":
                    marks = m["marks"]
                    b = slope(marks)
                    line += (
                        f", at {' / '.join(f'{int(k) // 1000}k {v:.0f}' for k, v in marks.items())}"
                        f": {b:.0f} bytes/record -> 11 M records "
                        f"~{m['start_mb'] + b * 11e6 / 2 ** 20:,.0f} MB")
                else:
                    line += f" ({m['stats'].get('skipped', 0):,} skipped)"
                print(line)
            with open(os.path.join(folder, "parsed.0-of-1.jsonl"), "rb") as f:
                files[impl] = f.read()
        if len(files) == 2:
            print(f"identical records: {files['old'] == files['new']}")


if __name__ == "__main__":
    main()
