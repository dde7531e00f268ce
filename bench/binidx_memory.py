"""Peak memory of building `data_path` from a binidx source, for binidx files of different sizes.

For each size, writes a binidx pair (`.bin` of uint16 tokens, `.idx` in the Megatron layout, each
document ending with token 0 as RWKV-LM's make_data.py writes them) in a temporary folder, then runs
`rwkv_infctx.data.prepare` on it in a fresh child process, the path `preload` and `fit` take. The
child reports its own peak memory:

- VmHWM: the peak resident set, as the kernel counts it. It includes pages of memory-mapped files
  (the `.bin` windows, the Arrow files `datasets` maps) while they are mapped; those are clean page
  cache the kernel can drop at any time, not memory the build holds.
- peak RssAnon: the peak of anonymous memory (heap, numpy and Arrow buffers), sampled every 20 ms:
  what the build itself holds, and what must not grow with the file.

    python bench/binidx_memory.py --gb 0.2 2
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

VOCAB = 50277  # ids below this fit both bundled tokenizers


def write_binidx(prefix: Path, gb: float, seed: int = 0) -> tuple[int, int]:
    """Write `prefix`.bin/.idx holding about `gb` GB of uint16 tokens; returns (documents, tokens)."""
    rng = np.random.default_rng(seed)
    target = int(gb * 1e9) // 2
    sizes: list[np.ndarray] = []
    written = 0
    with open(f"{prefix}.bin", "wb") as f:
        while written < target:
            lengths = rng.integers(200, 8000, size=4096)  # a block of documents, about 17 M tokens
            tokens = rng.integers(1, VOCAB, size=int(lengths.sum()), dtype=np.uint16)
            tokens[np.cumsum(lengths) - 1] = 0  # end of document, as make_data.py appends it
            f.write(tokens.tobytes())
            sizes.append(lengths.astype(np.int32))
            written += len(tokens)
    size = np.concatenate(sizes)
    pointers = np.concatenate([[0], np.cumsum(size[:-1].astype(np.int64) * 2)]).astype(np.int64)
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, len(size), len(size) + 1))
        f.write(size.tobytes() + pointers.tobytes() + np.arange(len(size) + 1, dtype=np.int64).tobytes())
    return len(size), written


def _status(key: str) -> int:
    """A `kB` field of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(prefix: str, data_path: str, rechunk: int, test_split: float) -> None:
    """Build `data_path` from `prefix` and print the peaks as JSON (runs in the child process)."""
    from rwkv_infctx.data import DataConfig, prepare

    peak_anon = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    config = DataConfig(
        source=prefix, tokenizer="world", data_path=data_path, rechunk_size=rechunk, test_split=test_split
    )
    meta = prepare(config).metadata
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    splits = meta["splits"]
    result = {
        "seconds": seconds,
        "vmhwm": _status("VmHWM"),
        "peak_anon": peak_anon[0],
        "samples": sum(s["samples"] for s in splits.values()),
        "tokens": sum(s["tokens"] for s in splits.values()),
    }
    print("RESULT " + json.dumps(result))


def measure(prefix: Path, data_path: Path, rechunk: int, test_split: float) -> dict[str, float]:
    args = [sys.executable, __file__, "--child", str(prefix), str(data_path), str(rechunk), str(test_split)]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gb", type=float, nargs="+", default=[0.2, 2.0], help="sizes of the .bin files")
    parser.add_argument("--rechunk", type=int, default=16384, help="data.rechunk_size of the build")
    parser.add_argument("--test-split", type=float, default=0.01, help="data.test_split of the build")
    parser.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        prefix, data_path, rechunk, test_split = args.child
        child(prefix, data_path, int(rechunk), float(test_split))
        return
    print(f"rechunk_size {args.rechunk}, test_split {args.test_split}, tokenizer world")
    print("| .bin GB | documents | tokens | samples | build s | VmHWM MB | peak RssAnon MB |")
    print("|---|---|---|---|---|---|---|")
    for gb in args.gb:
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="binidx-bench-") as tmp:
            prefix = Path(tmp) / "corpus"
            docs, tokens = write_binidx(prefix, gb)
            bin_gb = Path(f"{prefix}.bin").stat().st_size / 1e9
            r = measure(prefix, Path(tmp) / "prepared", args.rechunk, args.test_split)
            print(
                f"| {bin_gb:.2f} | {docs:,} | {tokens:,} | {r['samples']:,} | {r['seconds']:.0f} "
                f"| {r['vmhwm'] / 2**20:,.0f} | {r['peak_anon'] / 2**20:,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
