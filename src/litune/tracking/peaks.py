"""Peak dense FLOP/s of common accelerators, the denominator of MFU.

Why our own table and not ``lightning.fabric.utilities.throughput.get_available_flops``: Lightning's table gives the
H200 the *sparse* (2:4 structured sparsity) figure, finds no entry for the plain ``"NVIDIA H200"`` device name, and
lists the RTX 4090's non-tensor-core rate as its bf16 peak. MFU as defined by PaLM (Chowdhery et al. 2022, appendix B)
divides by the *dense* peak, so every number below is the dense tensor-core figure from the vendor's datasheet
(half of the "with sparsity" column), with FP32 accumulation where a datasheet gives both.
"""

from __future__ import annotations

import re

import torch

# dtype keys: "bf16", "fp16", "fp32" (plain FP32 on CUDA cores), "tf32" (FP32 matmuls on tensor cores).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    # Blackwell: HGX B200 datasheet, per GPU (4.5 PFLOPS sparse FP16/BF16).
    "b200": {"bf16": 2.25e15, "fp16": 2.25e15, "tf32": 1.1e15},
    # Hopper: H100 / H200 datasheets (the H200 has the H100's compute with more memory).
    "h200 sxm": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h200 nvl": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "h100 sxm": {"bf16": 989.4e12, "fp16": 989.4e12, "tf32": 494.7e12, "fp32": 66.9e12},
    "h100 nvl": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60.0e12},
    "h100 pcie": {"bf16": 756.0e12, "fp16": 756.0e12, "tf32": 378.0e12, "fp32": 51.2e12},
    # Ada: L4, L40, L40S datasheets; RTX 4090 from the Ada architecture whitepaper (FP32 accumulate).
    "l40s": {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183.0e12, "fp32": 91.6e12},
    "l40": {"bf16": 181.0e12, "fp16": 181.0e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "l4": {"bf16": 121.0e12, "fp16": 121.0e12, "tf32": 60.0e12, "fp32": 30.3e12},
    "rtx 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
    # Ampere: A100 (SXM and PCIe have the same peaks), A10 datasheet (AWS quotes the same figures for its A10G),
    # RTX A6000 datasheet, RTX 3090 from the GA102 whitepaper (FP32 accumulate).
    "a100": {"bf16": 312.0e12, "fp16": 312.0e12, "tf32": 156.0e12, "fp32": 19.5e12},
    "a10g": {"bf16": 125.0e12, "fp16": 125.0e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "a10": {"bf16": 125.0e12, "fp16": 125.0e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "a6000": {"bf16": 154.8e12, "fp16": 154.8e12, "tf32": 77.4e12, "fp32": 38.7e12},
    "rtx 3090": {"bf16": 71.0e12, "fp16": 71.0e12, "tf32": 35.6e12, "fp32": 35.6e12},
    # Turing and Volta have no bf16 and no tf32.
    "t4": {"fp16": 65.0e12, "fp32": 8.1e12},
    "v100 sxm": {"fp16": 125.0e12, "fp32": 15.7e12},
    "v100 pcie": {"fp16": 112.0e12, "fp32": 14.0e12},
    # AMD CDNA3 (ROCm builds of torch report it through torch.cuda).
    "mi300x": {"bf16": 1307.4e12, "fp16": 1307.4e12, "tf32": 653.7e12, "fp32": 163.4e12},
}

# Device-name patterns, most specific first ("h100 nvl" before "h100", "l40s" before "l40" before "l4").
_CHIP_PATTERNS: list[tuple[str, str]] = [
    (r"\bb200\b", "b200"),
    (r"h200.*nvl", "h200 nvl"),
    (r"h200", "h200 sxm"),
    (r"h100.*nvl", "h100 nvl"),
    (r"h100.*pcie", "h100 pcie"),
    (r"h100", "h100 sxm"),
    (r"\bl40s\b", "l40s"),
    (r"\bl40\b", "l40"),
    (r"\bl4\b", "l4"),
    (r"rtx 4090", "rtx 4090"),
    (r"a100", "a100"),
    (r"\ba10g\b", "a10g"),
    (r"\ba10\b", "a10"),
    (r"a6000", "a6000"),
    (r"rtx 3090", "rtx 3090"),
    (r"\bt4\b", "t4"),
    (r"v100.*pcie", "v100 pcie"),
    (r"v100", "v100 sxm"),
    (r"mi300x", "mi300x"),
]

# Lightning's `trainer.precision` strings mapped to the dtype the matmuls run in.
_PRECISION_DTYPE = {
    "bf16-mixed": "bf16",
    "bf16-true": "bf16",
    "bf16": "bf16",
    "16-mixed": "fp16",
    "16-true": "fp16",
    "16": "fp16",
    "32-true": "fp32",
    "32": "fp32",
}


def chip_of(device_name: str) -> str | None:
    """The :data:`PEAK_FLOPS` key for a device name such as ``"NVIDIA H100 80GB HBM3"``, or ``None`` if unknown."""
    name = device_name.lower()
    for pattern, chip in _CHIP_PATTERNS:
        if re.search(pattern, name):
            return chip
    return None


def compute_dtype(precision: str, tf32_matmuls: bool) -> str | None:
    """The matmul dtype key for a Lightning precision string.

    Args:
        precision: ``trainer.precision``, e.g. ``"bf16-mixed"``, ``"16-mixed"``, ``"32-true"``.
        tf32_matmuls: whether FP32 matmuls may use TF32 tensor cores (``torch.get_float32_matmul_precision() !=
            "highest"``); then the TF32 peak is the honest denominator.

    Returns:
        ``"bf16"``, ``"fp16"``, ``"fp32"``, ``"tf32"``, or ``None`` for precisions without a table entry (fp64, fp8).
    """
    dtype = _PRECISION_DTYPE.get(str(precision))
    if dtype == "fp32" and tf32_matmuls:
        return "tf32"
    return dtype


def peak_flops(device_name: str, dtype: str | None) -> float | None:
    """Peak dense FLOP/s of one device for one dtype.

    Args:
        device_name: e.g. ``torch.cuda.get_device_name()``.
        dtype: a key returned by :func:`compute_dtype`.

    Returns:
        FLOP/s, or ``None`` when the device or the dtype is not in the table (then MFU is not reported at all, rather
        than reported as a misleading zero).
    """
    chip = chip_of(device_name)
    if chip is None or dtype is None:
        return None
    return PEAK_FLOPS[chip].get(dtype)


def device_peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak dense FLOP/s of a Lightning root device under a Lightning precision; ``None`` on CPU or unknown GPUs."""
    if device.type != "cuda":
        return None
    tf32 = torch.get_float32_matmul_precision() != "highest" and torch.cuda.get_device_capability(device)[0] >= 8
    return peak_flops(torch.cuda.get_device_name(device), compute_dtype(precision, tf32))
