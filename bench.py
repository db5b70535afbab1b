"""Measure smoltrain: train-step throughput, MFU and peak memory; the data loader; prepare.py.

    python bench.py config/deepone.py                          # one train step config: tokens/s, MFU, peak memory
    python bench.py config/smoke.py --attn_impl=all            # every attention backend available here
    python bench.py config/deepone.py --lean_loss=all          # chunked head+loss vs plain full-logits loss
    python bench.py config/deepone.py --what=loader            # PackedLoader tokens/s and its share of a step
    python bench.py --what=prepare --source=DIR                # prepare.py tokens/s vs the tokenizer's own rate
    python bench.py config/smoke.py --json=True                # one JSON object per measurement, for machines

Takes the same config files and --key=value overrides as train.py (every train.py key is accepted; the ones
that don't affect a step are ignored), plus the bench keys below. Each measurement of a sweep ('all') runs in a
fresh process, so its peak memory is its own. Every table says what produced it: device, torch, dtype, compile.
"""
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from configurator import configure
from data import cu_seqlens_of
from model import (ATTN_IMPLS, ModelConfig, Transformer, attended_pairs, default_attn_impl, default_dtype,
                   gpu_peak_tflops, varlen_kernel)

HERE = Path(__file__).resolve().parent
BENCH_DEFAULTS = {
    "what": "train",     # 'train' | 'loader' | 'prepare'
    "steps": 5,          # timed steps (after warmup)
    "warmup": 2,         # untimed steps first: compilation, allocator warm-up
    "lean_loss": "on",   # 'on' (chunked head+loss, as train.py) | 'off' (full fp32 logits + F.cross_entropy) | 'all'
    "doc_len": 800,      # mean document length of the synthetic packed batch (smollm documents: ~700-1000 tokens)
    "source": "",        # --what=prepare: a local dir laid out like the hub repo
    "json": False,       # print JSON lines instead of a table
}


def train_defaults():
    """train.py's defaults, read from its source (no file imports train.py): the literal assignments above its
    configurator call, i.e. every key it accepts."""
    tree = ast.parse((HERE / "train.py").read_text())
    defaults = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "CHOICES" for t in node.targets):
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                defaults[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return defaults


def resolve_device_dtype(cfg):
    device = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = cfg["dtype"] if cfg["dtype"] != "auto" else default_dtype(device)
    return device, dtype


def peak_tflops(cfg, device):
    if cfg["peak_tflops"]:
        return cfg["peak_tflops"]
    return gpu_peak_tflops(torch.cuda.get_device_name()) if device == "cuda" else None


def synthetic_batch(cfg, device):
    """Random tokens packed into documents of random length (exponential, mean doc_len), shipped like
    data.PackedLoader's batches: (x, y, doc_ids, cu_seqlens)."""
    g = torch.Generator().manual_seed(0)
    B, T = cfg["batch_size"], cfg["block_size"]
    x = torch.randint(0, 50257, (B, T), generator=g)
    y = torch.randint(0, 50257, (B, T), generator=g)
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        lengths = (-torch.rand(T, generator=g).log() * cfg["doc_len"]).long().clamp(min=1)  # exponential
        starts = lengths.cumsum(0)
        doc_ids[b] = torch.bucketize(torch.arange(T), starts[starts < T], right=True)
    cu_seqlens = torch.from_numpy(cu_seqlens_of(doc_ids.numpy()))
    return x.to(device), y.to(device), doc_ids.to(device), cu_seqlens.to(device)


def attended_fraction(cu_seqlens, B, T):
    """Unmasked share of the B x T x T scores of document-causal attention (model.attended_pairs / B T^2):
    the same count train.py logs MFU with."""
    return attended_pairs(cu_seqlens).item() / (B * T * T)


def bench_train(cfg):
    device, dtype = resolve_device_dtype(cfg)
    fields = {f: cfg[f] for f in ModelConfig.__dataclass_fields__ if f in cfg}
    fields["attn_impl"] = cfg["attn_impl"] if cfg["attn_impl"] != "auto" else default_attn_impl(device)
    model = Transformer(ModelConfig(**fields)).to(device)
    if cfg["compile"]:
        model.compile_layers()
    optimizer = model.configure_optimizer(0.1, 1e-4, (0.9, 0.95), device)
    x, y, doc_ids, cu_seqlens = synthetic_batch(cfg, device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        with autocast:
            if cfg["lean_loss"] == "on":
                _, loss = model(x, y, doc_ids, cu_seqlens)
            else:
                logits, _ = model(x, doc_ids=doc_ids, cu_seqlens=cu_seqlens)
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(cfg["warmup"]):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(cfg["steps"]):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / cfg["steps"]
    tokens = cfg["batch_size"] * cfg["block_size"]
    # MFU counts only the attended part of the scores: sparse kernels (flex, flash) skip the rest
    frac = attended_fraction(cu_seqlens, cfg["batch_size"], cfg["block_size"])
    flops = model.flops_per_token(cfg["block_size"], attn_fraction=frac) * tokens
    peak = peak_tflops(cfg, device)
    return {"what": "train", "attn_impl": fields["attn_impl"], "lean_loss": cfg["lean_loss"],
            "params_M": round(model.num_params() / 1e6, 2), "batch": f"{cfg['batch_size']}x{cfg['block_size']}",
            "step_ms": round(seconds * 1e3, 1), "tokens_per_s": round(tokens / seconds),
            "tflops": round(flops / seconds / 1e12, 3), "mfu": round(flops / seconds / 1e12 / peak, 4) if peak else None,
            "peak_mem_GB": round(peak_memory_bytes(device) / 2**30, 2), "attn_fraction": round(frac, 4)}


def peak_memory_bytes(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS (Linux reports KiB)


def bench_loader(cfg):
    from data import PackedLoader
    device, _ = resolve_device_dtype(cfg)
    loader = PackedLoader(cfg["data_dir"], block_size=cfg["block_size"], batch_size=cfg["batch_size"],
                          device=device if device == "cuda" else None)
    for _ in range(cfg["warmup"]):
        loader.next_batch()
    n = max(cfg["steps"], 20)
    t0 = time.perf_counter()
    for _ in range(n):
        loader.next_batch()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / n
    step = run_child(cfg, {"what": "train", "lean_loss": "on"})
    return {"what": "loader", "batch": f"{cfg['batch_size']}x{cfg['block_size']}", "batch_ms": round(seconds * 1e3, 2),
            "tokens_per_s": round(cfg["batch_size"] * cfg["block_size"] / seconds),
            "step_ms": step["step_ms"], "share_of_step_pct": round(100 * seconds * 1e3 / step["step_ms"], 4)}


def bench_prepare(cfg):
    import pyarrow.parquet as pq
    import prepare
    if not cfg["source"] or not Path(cfg["source"]).is_dir():
        raise SystemExit(f"bench.py: --what=prepare needs --source=DIR, a local dir laid out like the hub repo "
                         f"(got {cfg['source']!r})")
    texts = [t for f in sorted(Path(cfg["source"]).glob("*/train-*.parquet"))
             for t in pq.read_table(f, columns=["text"]).column(0).to_pylist() if t]
    enc = prepare.get_encoding()
    t0 = time.perf_counter()
    n_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=1))
    single = n_tokens / (time.perf_counter() - t0)
    workers = os.cpu_count()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / "prepare.py"), "--source", cfg["source"], "--out", out,
                        "--workers", str(workers), "--val-docs", "0"], check=True, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
    return {"what": "prepare", "documents": len(texts), "tokens": n_tokens, "workers": workers,
            "prepare_tokens_per_s": round(n_tokens / seconds), "prepare_seconds": round(seconds, 2),
            "tokenizer_1proc_tokens_per_s": round(single)}


def run_child(cfg, changes):
    """One measurement in a fresh process (its own peak memory); returns its JSON record."""
    args = [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in {**cfg, **changes}.items()
            if v is not None]
    proc = subprocess.run([sys.executable, str(HERE / "bench.py"), *args, "--json=True"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1], **changes}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def header(cfg):
    device, dtype = resolve_device_dtype(cfg)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = peak_tflops(cfg, device)
    return (f"device: {name} | torch {torch.__version__} | dtype {dtype} | compile {cfg['compile']}"
            + (f" | MFU peak {peak} TFLOP/s (bf16 dense)" if peak else "")
            + "\nFLOPs per token = 6 * (body params + vocab * d_model) + 12 * n_layer * d_model * T * attn_fraction")


def main():
    cfg = configure({**train_defaults(), **BENCH_DEFAULTS}, sys.argv[1:])
    sweeps = {"attn_impl": [a for a in ATTN_IMPLS if available(a, cfg)] if cfg["attn_impl"] == "all" else None,
              "lean_loss": ["off", "on"] if cfg["lean_loss"] == "all" else None}
    if cfg["what"] == "train" and any(sweeps.values()):
        combos = [{}]
        for key, values in sweeps.items():
            if values:
                combos = [{**c, key: v} for c in combos for v in values]
        records = [run_child(cfg, c) for c in combos]
    else:
        records = [{"train": bench_train, "loader": bench_loader, "prepare": bench_prepare}[cfg["what"]](cfg)]
    if cfg["json"]:
        for r in records:
            print(json.dumps(r))
        return
    print(header(cfg))
    keys = list(dict.fromkeys(k for r in records for k in r))
    rows = [[str(r.get(k, "")) for k in keys] for r in records]
    widths = [max(len(k), *(len(row[i]) for row in rows)) for i, k in enumerate(keys)]
    print(" | ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))


def available(attn_impl, cfg):
    device, _ = resolve_device_dtype(cfg)
    if attn_impl == "flash_attention_2":  # flash-attn or torch.nn.attention.varlen, on CUDA only
        try:
            varlen_kernel()
        except (ImportError, RuntimeError):
            return False
        return device == "cuda"
    return not (attn_impl == "flex_attention" and device == "cpu")  # no flex backward on CPU


if __name__ == "__main__":
    main()
