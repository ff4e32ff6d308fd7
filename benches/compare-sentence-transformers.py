#!/usr/bin/env python3
"""all-MiniLM-L6-v2: spinfer beside sentence-transformers (PyTorch) on the same sentences, the
same thread count, interleaved (spinfer, then sentence-transformers, then spinfer again ...).

    fixtures/.venv/bin/python benches/compare-sentence-transformers.py [--pairs 3] [--threads 2]

spinfer: `spinfer bench --model all-minilm-l6-v2` (SPINFER, default target/release/spinfer;
registry fixtures/real/registry, made by fixtures/fetch-minilm.sh), batch 32 line.
sentence-transformers: SentenceTransformer(<that same folder>).encode(batch, batch_size=32)
over the very batches spinfer's bench embeds (its sample_sentences(64), rounds 0-3 of 32), with
torch.set_num_threads(--threads), after one warm-up round. The script checks that both sides
count the same tokens per sentence, so they embed the same text.
Needs: pip install sentence-transformers (the fixtures venv has torch already).
"""
import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = None  # read from src/bench.rs, so the two generators cannot drift apart


def sample_sentences(count):
    """src/bench.rs sample_sentences: the same xorshift64 and word list."""
    global WORDS
    if WORDS is None:
        src = open(os.path.join(ROOT, "src", "bench.rs")).read()
        body = src[src.index("const WORDS: &[&str] = &["):]
        body = body[: body.index("];")]
        WORDS = re.findall(r'"([^"]*)"', body)
    mask = (1 << 64) - 1
    seed = 0x2545F4914F6CDD1D

    def nxt():
        nonlocal seed
        seed ^= (seed << 13) & mask
        seed ^= seed >> 7
        seed ^= (seed << 17) & mask
        return seed

    out = []
    for _ in range(count):
        n = 8 + nxt() % 13
        out.append(" ".join(WORDS[nxt() % len(WORDS)] for _ in range(n)) + ".")
    return out


def spinfer_run(binary, registry, threads):
    out = subprocess.run(
        [binary, "bench", "--registry", registry, "--model", "all-minilm-l6-v2",
         "--threads", str(threads)],
        check=True, capture_output=True, text=True).stdout
    m = re.search(r"batch 32: ([\d.]+) sentences/s \(([\d.]+) tokens/s\)", out)
    return float(m.group(1)), float(m.group(2))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    import torch
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(a.threads)
    registry = os.path.join(ROOT, "fixtures", "real", "registry")
    folder = os.path.join(registry, "all-minilm-l6-v2")
    binary = os.environ.get("SPINFER", os.path.join(ROOT, "target", "release", "spinfer"))
    model = SentenceTransformer(folder, device="cpu")
    refs = sample_sentences(64)
    batches = [refs[(r * 32) % 33:(r * 32) % 33 + 32] for r in range(4)]
    tokens = sum(len(model.tokenizer(s)["input_ids"]) for b in batches for s in b)
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    print(f"CPU: {cpu}; {os.cpu_count()} CPUs; threads {a.threads}; torch {torch.__version__}, "
          f"sentence-transformers {sentence_transformers.__version__}; "
          f"load average at start: {open('/proc/loadavg').read().split()[:3]}")
    print("| pair | spinfer sentences/s | sentence-transformers sentences/s | ratio |")
    print("|---|---|---|---|")
    model.encode(batches[0], batch_size=32)  # warm-up
    for pair in range(1, a.pairs + 1):
        sps, tps = spinfer_run(binary, registry, a.threads)
        # Same text on both sides: spinfer's tokens per sentence equal the tokenizer's here.
        if abs(tps / sps - tokens / 128) > 0.05:
            sys.exit(f"token counts differ: spinfer {tps / sps:.2f}/sentence, here {tokens / 128:.2f}")
        t0 = time.perf_counter()
        for b in batches:
            model.encode(b, batch_size=32)
        st = 128 / (time.perf_counter() - t0)
        print(f"| {pair} | {sps:.1f} | {st:.1f} | {sps / st:.2f} |")
    print(f"load average at end: {open('/proc/loadavg').read().split()[:3]}")


if __name__ == "__main__":
    main()
