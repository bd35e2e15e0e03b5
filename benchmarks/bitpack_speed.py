"""Bit packing speed: pack and unpack 22.7 million values (the weight count of all-MiniLM-L6-v2) at
several widths, on 2 threads. Target: 4-bit and 8-bit well under a second each way.

    .venv/bin/python benchmarks/bitpack_speed.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, machine_info, today, write_results  # noqa: E402

from shrinktunnel.codec import pack, unpack  # noqa: E402

COUNT, THREADS, REPEATS = 22_700_000, 2, 5
WIDTHS = [(1, False), (2, True), (3, True), (4, True), (8, True), (12, True), (16, True)]
TARGET_S = 1.0  # for the widths the artifact stores most: 4 and 8 bits


def best_of(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    torch.set_num_threads(THREADS)
    gen = torch.Generator().manual_seed(0)
    rows, checks = [], {}
    for bits, signed in WIDTHS:
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1))) if signed else (0, 1 << bits)
        values = torch.randint(lo, hi, (COUNT,), generator=gen, dtype=torch.int32 if bits > 8 else torch.int16)
        values = values.to(torch.int8) if signed and bits <= 8 else values
        packed = pack(values, bits, signed)
        assert torch.equal(unpack(packed, bits, signed, COUNT).to(torch.int64), values.to(torch.int64))
        t_pack = best_of(lambda: pack(values, bits, signed))
        t_unpack = best_of(lambda: unpack(packed, bits, signed, COUNT))
        rows.append({"bits": bits, "signed": signed, "bytes": packed.numel(), "pack_s": t_pack, "unpack_s": t_unpack})
        if bits in (4, 8):
            checks[f"{bits}-bit pack and unpack < {TARGET_S} s"] = max(t_pack, t_unpack) < TARGET_S
    md = [f"Measured {today()}; {COUNT:,} values, {THREADS} threads, best of {REPEATS}. "
          "Reproduce with `.venv/bin/python benchmarks/run_all.py`.", "",
          "| bits | signed | packed size | pack | unpack |", "|---:|---|---:|---:|---:|"]
    md += [f"| {r['bits']} | {r['signed']} | {r['bytes'] / 2**20:.1f} MiB | {r['pack_s'] * 1e3:.0f} ms | {r['unpack_s'] * 1e3:.0f} ms |" for r in rows]
    md += ["", "| target | result |", "|---|---|"] + [f"| {k} | {'pass' if v else 'FAIL'} |" for k, v in checks.items()]
    results = {"date": today(), "machine": machine_info(THREADS), "count": COUNT, "rows": rows, "checks": checks}
    write_results(RESULTS_DIR / "bitpack_speed.json", results, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
