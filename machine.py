"""
What this machine runs: the device, compute dtype, attention backend and distributed backend that 'auto' settings
resolve to, with one message per impossible combination, the GPU peak table for MFU, and the peak memory a
process has used. train.py, sample.py and the tools resolve 'auto' through it alike.

    from machine import resolve, check_float8, gpu_peak_tflops, peak_memory_gib
    device, dtype, attn_impl, backend = resolve("auto", "auto", "float32", "auto", "auto")  # ValueError if impossible
    check_float8(device)                       # ValueError unless FP8 matmuls can run here
    is_out_of_memory(error), memory_of("cuda") # an allocation failure; the device's name and total bytes
    gpu_peak_tflops("NVIDIA H100 80GB HBM3")  # 989, or None for an unknown GPU
    peak_memory_gib("cuda")                    # this process's peak memory so far
"""
import importlib.util
import os
import re

import torch


def default_attn_impl(device_type):
    """flex_attention on GPU (block-sparse document masks); sdpa on CPU, where flex has no backward."""
    return "flex_attention" if device_type == "cuda" else "sdpa"


def default_dtype(device_type):
    """bfloat16 autocast where matmuls run natively in bf16 (CUDA; CPUs with AVX512-BF16 or AMX, as oneDNN
    reports them), else float32: on a CPU without them bf16 is emulated and slower than fp32."""
    if device_type == "cuda":
        return "bfloat16"
    return "bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32"


def resolve(device="auto", dtype="auto", param_dtype="float32", attn_impl="auto", backend="auto"):
    """(device, dtype, attn_impl, backend) with every 'auto' resolved for this machine: cuda if torch sees a GPU;
    bf16 autocast where it is native (and always with bf16 weights); flex_attention on CUDA, sdpa on the CPU; nccl on
    CUDA, gloo on the CPU. A ValueError names a combination that cannot run and what to pass instead."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no GPU (a CPU build of torch, or CUDA_VISIBLE_DEVICES empty); "
                         "use --device=cpu")
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl" and device == "cpu":
        raise ValueError("backend='nccl' needs GPUs; on the CPU use --backend=gloo (or leave backend='auto')")
    if dtype == "auto":
        dtype = "bfloat16" if param_dtype == "bfloat16" else default_dtype(device)
    if param_dtype == "bfloat16" and dtype != "bfloat16":
        raise ValueError("param_dtype='bfloat16' computes in bf16 (bf16 weights); use --dtype=bfloat16 or "
                         "--dtype=auto with it")
    if attn_impl == "auto":
        attn_impl = default_attn_impl(device)
    if attn_impl == "flash_attention_2" and (device == "cpu" or dtype != "bfloat16"):
        raise ValueError(f"attn_impl='flash_attention_2' runs on CUDA in bf16 only (here device={device!r}, "
                         f"dtype={dtype!r}); use --dtype=bfloat16 on a GPU, or --attn_impl=flex_attention (GPU) or sdpa")
    return device, dtype, attn_impl, backend


def is_out_of_memory(error):
    """True for an allocation that failed for want of memory: CUDA's OutOfMemoryError, or the CPU allocator's."""
    return isinstance(error, torch.OutOfMemoryError) or "DefaultCPUAllocator: can't allocate memory" in str(error)


def memory_of(device_type):
    """(the device's name, its memory in bytes): the current GPU's, or this machine's RAM."""
    if device_type == "cuda":
        return torch.cuda.get_device_name(), torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return "this machine's RAM", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_float8(device):
    """A ValueError naming everything float8=True lacks here: torchao (an optional extra) and a CUDA GPU with FP8
    tensor cores (compute capability 8.9, Ada and Hopper, or later)."""
    lacking = []
    if importlib.util.find_spec("torchao") is None:  # found, not imported: its import is slow and talks on a CPU
        lacking.append("torchao is not installed (pip install torchao)")
    if device != "cuda":
        lacking.append(f"the device is {device}, not a CUDA GPU")
    elif torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        lacking.append(f"this GPU ({torch.cuda.get_device_name()}) has compute capability {major}.{minor}, without "
                       f"FP8 tensor cores")
    if lacking:
        raise ValueError(f"float8=True needs torchao and a GPU of compute capability 8.9 or later (H100, H200, L4, "
                         f"L40S, RTX 4090), but {'; and '.join(lacking)}. Train in bf16 without it (--float8=False).")


# Dense bf16 tensor-core peak per GPU in TFLOP/s, from NVIDIA's datasheets (the sparsity figures halved; L40:
# "BF16 Tensor Core 181.05 TFLOPS", L40S: 362.05). A key matches the device name as whole words ("L4" does not match
# "NVIDIA L40") and the longest matching key wins ("H100 PCIe" over "H100").
PEAK_BF16_TFLOPS = {"H100": 989, "H100 PCIe": 756, "H100 NVL": 835, "H200": 989, "B200": 2250, "A100": 312,
                    "L40S": 362, "L40": 181, "A10": 125, "L4": 121, "RTX 4090": 165}


def gpu_peak_tflops(device_name):
    """Dense bf16 peak of a GPU by name, or None when unknown (then pass it yourself: train.py --peak_tflops)."""
    words = re.split(r"[\s\-_]+", device_name)  # "NVIDIA A100-SXM4-80GB" -> NVIDIA, A100, SXM4, 80GB
    found = [key for key in PEAK_BF16_TFLOPS if _contains_words(words, key.split())]
    return PEAK_BF16_TFLOPS[max(found, key=len)] if found else None


def _contains_words(words, key_words):
    n = len(key_words)
    return any(words[i:i + n] == key_words for i in range(len(words) - n + 1))


def peak_memory_gib(device_type):
    """This process's peak memory so far in GiB: the CUDA caching allocator's peak allocation on a GPU (what
    a memory prediction predicts), the process's peak RSS elsewhere."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB
