"""Benchmark harness behind ``diffit-toolkit bench`` (see ``docs/performance.md``).

[`run_bench`][diffit_toolkit.bench.harness.run_bench] measures, for one model (a recipe or a
backbone preset), the training step
(forward + backward + AdamW) per attention backend and with/without ``torch.compile``: img/s,
MFU and peak memory; an attention-only microbenchmark; sampling img/s with guidance; and the
same-size DiT (``adaln_zero``) model side by side. The result is a JSON-ready dict.
"""

from diffit_toolkit.bench.harness import (
    PEAK_TFLOPS,
    BenchConfig,
    attention_microbench,
    device_peak_tflops,
    run_bench,
)

__all__ = ["PEAK_TFLOPS", "BenchConfig", "attention_microbench", "device_peak_tflops", "run_bench"]
