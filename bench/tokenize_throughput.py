"""Tokenization throughput of the data pipeline: MB/s of text and tokens/s, `neox` beside `world`.

Generates a corpus of JSONL documents (words drawn by their frequency in the bundled tiny-shakespeare,
so the tokenizers see a natural word distribution, not repeats of one text) in a temporary folder,
then runs `rwkv_infctx.data.prepare` on it, the path `preload` and `fit` take: load, tokenize, filter,
save. Reports the whole build and, separately, the tokenize step alone.

    python bench/tokenize_throughput.py --mb 100 --num-proc 1 2
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

DOC_BYTES = 4096


def make_corpus(path: Path, mb: float, seed: int = 0) -> int:
    """Write about `mb` MB of JSONL documents to `path`; returns the exact number of text bytes."""
    from rwkv_infctx.tokenizer import asset_path

    counts = Counter(re.findall(r"[A-Za-z']+|[.,;:!?]", asset_path("tinyshakespeare.txt").read_text()))
    words = np.array(list(counts))
    p = np.array(list(counts.values()), dtype=np.float64)
    rng = np.random.default_rng(seed)
    target, written = int(mb * 1e6), 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            picks = words[rng.choice(len(words), size=8192, p=p / p.sum())]
            lines = [" ".join(picks[i : i + 12]) for i in range(0, len(picks), 12)]
            text = "\n".join(lines)
            for start in range(0, len(text), DOC_BYTES):
                doc = text[start : start + DOC_BYTES]
                f.write(json.dumps({"text": doc}) + "\n")
                written += len(doc.encode("utf-8"))
    return written


def run(corpus: Path, text_bytes: int, tokenizer: str, num_proc: int, work: Path) -> dict[str, float]:
    from rwkv_infctx.data import DataConfig, prepare
    from rwkv_infctx.data.encode import Column, Encoder, tokenize
    from rwkv_infctx.data.sources import load_source, resolve_source

    data_path = work / f"prepared-{tokenizer}-{num_proc}"
    config = DataConfig(source=str(corpus), tokenizer=tokenizer, data_path=str(data_path), num_proc=num_proc)
    start = time.perf_counter()
    done = prepare(config)
    build_s = time.perf_counter() - start
    tokens = done.metadata["splits"]["train"]["tokens"]

    # A fresh cache folder, so `datasets` cannot answer from an earlier run's cached map.
    raw = load_source(resolve_source(config), config, str(work / f"cache-{tokenizer}-{num_proc}"))
    start = time.perf_counter()
    tokenize(raw, Encoder(tokenizer, (Column("text"),)), num_proc)
    tok_s = time.perf_counter() - start
    return {"build_s": build_s, "tokenize_s": tok_s, "tokens": tokens, "mb": text_bytes / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size in MB of UTF-8 text")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1], help="tokenization processes")
    parser.add_argument("--tokenizers", nargs="+", default=["neox", "world"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rwkv-tokbench-") as tmp:
        work = Path(tmp)
        start = time.perf_counter()
        corpus = work / "corpus.jsonl"
        text_bytes = make_corpus(corpus, args.mb)
        print(f"corpus: {text_bytes / 1e6:.1f} MB of text in {time.perf_counter() - start:.1f} s")
        header = f"{'tokenizer':<10}{'procs':>6}{'tokens':>14}{'build s':>9}{'MB/s':>8}{'tok/s':>12}"
        header += f"{'tokenize s':>12}{'MB/s':>8}{'tok/s':>12}"
        results = []
        for num_proc in args.num_proc:
            for name in args.tokenizers:
                r = run(corpus, text_bytes, name, num_proc, work)
                build, tok = r["build_s"], r["tokenize_s"]
                results.append(
                    f"{name:<10}{num_proc:>6}{r['tokens']:>14,}"
                    f"{build:>9.1f}{r['mb'] / build:>8.2f}{r['tokens'] / build:>12,.0f}"
                    f"{tok:>12.1f}{r['mb'] / tok:>8.2f}{r['tokens'] / tok:>12,.0f}"
                )
                print(results[-1], flush=True)
        print("\n" + header + "\n" + "\n".join(results))


if __name__ == "__main__":
    main()
