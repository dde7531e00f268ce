"""Loss-by-position results as a text table, a long-format CSV, and a PNG plot (log x-axis).

`results` maps a model label to its bucket rows; every model was evaluated on the same samples, so
they share bucket edges.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from rwkv_infctx.evaluation.positions import BucketRow
from rwkv_infctx.io.atomic import atomic_path

Results = dict[str, list[BucketRow]]
CSV_COLUMNS = ("model", "bucket_start", "bucket_end", "tokens", "mean_loss", "perplexity")


def _fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def format_table(results: Results) -> str:
    """Positions and token counts (shared by all models), then a `loss  ppl` column group per model."""
    labels = list(results)
    widths = [max(19, len(label)) for label in labels]
    lines = [
        f"{'positions':>17} {'tokens':>10}"
        + "".join(f"  {lb:>{w}}" for lb, w in zip(labels, widths, strict=True)),
        f"{'':>17} {'':>10}" + "".join(f"  {'loss':>{w - 11}} {'ppl':>10}" for w in widths),
    ]
    for i, row in enumerate(results[labels[0]]):
        line = f"{f'{row.start:,}-{row.end:,}':>17} {row.tokens:>10,}"
        for label, w in zip(labels, widths, strict=True):
            r = results[label][i]
            line += f"  {_fmt(r.mean_loss, '.4f'):>{w - 11}} {_fmt(r.perplexity, '.2f'):>10}"
        lines.append(line)
    return "\n".join(lines)


def write_csv(path: Path, results: Results) -> None:
    """Long format: one line per (model, bucket); written atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for label, rows in results.items():
            for r in rows:
                loss, ppl = f"{r.mean_loss:.6f}", f"{r.perplexity:.4f}"
                writer.writerow([label, r.start, r.end, r.tokens, loss, ppl])


def write_png(path: Path, results: Results, title: str) -> None:
    """One line per model: mean loss against the bucket's geometric centre, log x-axis; atomic."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    try:
        for label, rows in results.items():
            kept = [r for r in rows if r.tokens]
            x = [math.sqrt(r.start * r.end) for r in kept]
            ax.plot(x, [r.mean_loss for r in kept], marker="o", label=label)
        edges = sorted({e for rows in results.values() for r in rows for e in (r.start, r.end)})
        ax.set_xscale("log", base=2)
        ax.set_xticks(edges, [f"{e:,}" for e in edges], minor=False)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_xlabel("token position in sample (points at bucket geometric centres; ticks at bucket edges)")
        ax.set_ylabel("mean loss (nats/token)")
        ax.set_title(title)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
