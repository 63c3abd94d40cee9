"""Benchmarks that write JSON (`dit4dit bench ...`); helpers shared by them.

- `inference`: policy-step latency, our path against the naive one (`bench inference`);
- `data`: data-loading throughput of the training pipeline (`bench data`);
- `train`: training throughput and MFU, our step against the plain one (`bench train`);
- `serve`: policy-server round trips and throughput over loopback (`bench serve`); `fuzz`: its
  hostile-message run (`bench serve --fuzz N`).
"""

from __future__ import annotations

import platform

import torch


def device_name(device: torch.device) -> str:
    """The device as a result file names it: the GPU model, or the CPU with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (timings must include it); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
