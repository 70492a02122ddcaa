"""Server memory benchmark: resident memory of real `platform serve` processes per weight mode.

Starts one `platform serve --model M --blocks 0:15 --no-dht` process per mode (float32,
bfloat16, int8, nf4; one at a time, so they do not compete for memory), waits for its READY
line, and reads the process's resident memory (VmRSS) and its peak (VmHWM) from /proc. The
baseline is the float32 server of the same span in the same run. Beside the RSS, the bytes of
the span's weights as the server holds them (`quantized_bytes` of a span loaded in this
process the way the server loads it, `load_served_span`), so the RSS difference can be read against the weights'.

Default model: the real SmolLM2-135M-Instruct (`cached_import()`), span 0:15 (half of it).
Results go to `benchmarks/results/server_memory.json`.

    python benchmarks/server_memory.py            # four modes, about a minute and a half
    python benchmarks/server_memory.py --quick    # float32 and int8 only
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _results import Run, machine_info, torch_stack, warn_if_loaded

from corolla.inference.models.checkpoint import Checkpoint
from corolla.inference.models.importer import cached_import
from corolla.inference.server.loading import load_served_span
from corolla.inference.server.quantization import QuantMode, quantized_bytes
from corolla.platform.launch.servers import LocalServers

RESULTS = Path(__file__).resolve().parent / "results" / "server_memory.json"
MODES: dict[str, list[str]] = {
    "float32": [],
    "bfloat16": ["--dtype", "bfloat16"],
    "int8": ["--quant", "int8"],
    "nf4": ["--quant", "nf4"],
}
QUICK_MODES = ("float32", "int8")
MB = 1e6


def proc_memory(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of process `pid`, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024 / MB  # the kernel writes kB
    return {"rss_mb": round(fields["VmRSS"], 1), "peak_rss_mb": round(fields["VmHWM"], 1)}


def serve_and_measure(model: Path, span: tuple[int, int], args: Sequence[str]) -> dict[str, float]:
    with LocalServers(model, [span], extra_args=["--no-dht", *args], torch_threads=1) as servers:
        return proc_memory(servers.servers[0].process.pid)


def weight_bytes(model: Path, span: tuple[int, int], mode: str) -> float:
    """MB of the span's weights as a server of `mode` holds them."""
    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
    quant: QuantMode | None = "int8" if mode == "int8" else "nf4" if mode == "nf4" else None
    loaded = load_served_span(
        Checkpoint.open(model), span[0], span[1], dtype=dtype, device=torch.device("cpu"), quant=quant
    )
    return round(quantized_bytes(loaded) / MB, 1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="float32 and int8 only")
    parser.add_argument("--model", type=Path, help="checkpoint directory (default: the imported SmolLM2)")
    parser.add_argument("--blocks", default="0:15", metavar="START:END", help="span to serve (default 0:15)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    args = parser.parse_args(argv)
    model = args.model or cached_import()
    start, end = (int(x) for x in args.blocks.split(":"))
    modes = QUICK_MODES if args.quick else tuple(MODES)
    run = Run("server_memory", quick=args.quick, machine=machine_info(**torch_stack()))
    result: dict[str, Any] = run.result
    result["model"] = str(model)
    result["blocks"] = f"{start}:{end}"
    rows: dict[str, dict[str, float]] = {}
    for mode in modes:
        rows[mode] = serve_and_measure(model, (start, end), MODES[mode])
        rows[mode]["weights_mb"] = weight_bytes(model, (start, end), mode)
        print(f"{mode:9s} rss {rows[mode]['rss_mb']:7.1f} MB  peak {rows[mode]['peak_rss_mb']:7.1f} MB  "
              f"weights {rows[mode]['weights_mb']:6.1f} MB", flush=True)  # fmt: skip
    base = rows["float32"]
    for row in rows.values():
        row["rss_vs_float32"] = round(row["rss_mb"] / base["rss_mb"], 3)
        row["peak_vs_float32"] = round(row["peak_rss_mb"] / base["peak_rss_mb"], 3)
    result["servers"] = rows
    result["headline"] = {
        mode: f"{row['rss_mb']:.0f} MB RSS ({row['rss_vs_float32']:.2f}x float32), peak {row['peak_rss_mb']:.0f} MB"
        for mode, row in rows.items()
    }
    run.finish(args.out)
    warn_if_loaded(result["machine"], ": RSS does not depend on load, but the run took longer.")
    run.print_written()
    return 0


if __name__ == "__main__":
    sys.exit(main())
