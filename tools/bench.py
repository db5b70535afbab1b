"""Measure smoltrain: train-step throughput, MFU and peak memory; the data loader; prepare.py.

    python -m tools.bench config/deepone.py                          # one train step config: tokens/s, MFU, peak memory
    python -m tools.bench config/smoke.py --attn_impl=all            # every attention backend available here
    python -m tools.bench config/deepone.py --lean_loss=all          # chunked head+loss vs plain full-logits loss
    python -m tools.bench config/deepone.py --what=loader            # PackedLoader tokens/s and its share of a step
    python -m tools.bench config/deepone.py --what=profile           # where a step's time goes: top kernels, shares
    python -m tools.bench config/deepone.py --grad_accum=8           # a step of 8 micro-steps and one optimizer step
    python -m tools.bench config/deepone.py --optimizer=muon,adamw   # each optimizer in turn on one compiled model
    python -m tools.bench config/llama_52m.py --what=reference --reference=nanoGPT/model.py   # nanoGPT's own model
    python -m tools.bench config/smoke.py --batch=data               # train.py's first real batch, not a synthetic one
    python -m tools.bench --what=prepare --source=DIR                # prepare.py tokens/s vs the tokenizer's own rate
    python -m tools.bench config/deepone.py --what=tasks             # eval_tasks' cost per example (HellaSwag-shaped)
    python -m tools.bench config/deepone.py --what=tasks --eval_tasks=hellaswag --eval_tasks_limit=500   # a real task
    python -m tools.bench config/smoke.py --json=True                # one JSON object per measurement, for machines
    python -m tools.bench config/deepone_1b7.py --memory_limit_gb=24 # as if the GPU had 24 GiB
    python -m tools.bench config/deepone.py --dry_run=True           # resolve the config and the measurements, run nothing

Takes the same config files and --key=value overrides as train.py (every train.py key is accepted; the ones
that don't affect a step are ignored), plus the bench keys below. Each measurement of a sweep ('all') runs in a
fresh process, so its peak memory is its own. Every table says what produced it: device, torch, dtype, compile.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import memory_estimate
import optim
import settings
from configurator import configure
from data import cu_seqlens_of
from model import ATTN_IMPLS, ModelConfig, Transformer, recompute_interval, varlen_kernel
from machine import check_float8, default_attn_impl, gpu_peak_tflops, is_out_of_memory, peak_memory_gib, resolve

ROOT = Path(__file__).resolve().parents[1]  # the repository: the core and config/
BENCH_DEFAULTS = {
    "what": "train",     # 'train' | 'loader' | 'prepare' | 'profile' | 'memory' | 'tasks' | 'reference'
    "steps": 5,          # timed steps (after warmup)
    "warmup": 2,         # untimed steps first: compilation, allocator warm-up
    "lean_loss": "on",   # 'on' (chunked head+loss, as train.py) | 'off' (full fp32 logits + F.cross_entropy) | 'all'
    "doc_len": 800,      # mean document length of the synthetic packed batch (smollm documents: ~700-1000 tokens);
    #                      0: one causal sequence per row, no documents (nanoGPT's setting)
    "batch": "synthetic",  # 'synthetic' (random tokens, documents of mean doc_len) | 'data' (train.py's first batch)
    "source": "",        # --what=prepare: a local dir laid out like the hub repo
    "json": False,       # print JSON lines instead of a table
    "gpu_gb": 24.0,      # --what=memory: one GPU's memory in GB (2^30 bytes), e.g. 24 for an RTX 4090 / L4 / A10
    "reserve_gb": 1.0,   # --what=memory: of gpu_gb, left for the CUDA context and allocator fragmentation
    "ranks": 1,          # --what=memory: ranks that share the FSDP shards (parallel='fsdp')
    "memory_limit_gb": 0.0,  # CUDA: cap this process at N GiB (set_per_process_memory_fraction), as on a smaller GPU
    "reference": "",     # --what=reference: the path of nanoGPT's model.py (karpathy/nanoGPT; read, never committed)
}
BENCH_CHOICES = {"what": ("train", "loader", "prepare", "profile", "memory", "tasks", "reference"), "lean_loss": ("on", "off", "all"),
                 "batch": ("synthetic", "data")}


def resolve_device_dtype(cfg):
    """cfg's device and compute dtype, 'auto' resolved as train.py resolves it (machine.resolve); the attention
    backend is checked per measurement (attn_impl may be 'all')."""
    device, dtype, _, _ = resolve(cfg["device"], cfg["dtype"], cfg["param_dtype"])
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
    n_tokens = min(50257, cfg["vocab_size"])  # GPT-2's tokens, or fewer for a model with a smaller vocabulary
    x = torch.randint(0, n_tokens, (B, T), generator=g)
    y = torch.randint(0, n_tokens, (B, T), generator=g)
    doc_ids = torch.zeros(B, T, dtype=torch.long)
    for b in range(B if cfg["doc_len"] else 0):
        lengths = (-torch.rand(T, generator=g).log() * cfg["doc_len"]).long().clamp(min=1)  # exponential
        starts = lengths.cumsum(0)
        doc_ids[b] = torch.bucketize(torch.arange(T), starts[starts < T], right=True)
    cu_seqlens = torch.from_numpy(cu_seqlens_of(doc_ids.numpy()))
    # doc_len 0: one sequence per row and no doc_ids, so every backend runs plain causal attention (sdpa its
    # is_causal kernel), as nanoGPT does
    return x.to(device), y.to(device), doc_ids.to(device) if cfg["doc_len"] else None, cu_seqlens.to(device)


def data_batch(cfg, device):
    """The first batch train.py reads from data_dir on rank 0 of one (same loader, same seed): real documents."""
    from data import DataError, PackedLoader, check_vocab
    try:
        check_vocab(cfg["data_dir"], cfg["vocab_size"])
    except DataError as e:
        raise SystemExit(f"bench.py: {e}") from None
    loader = PackedLoader(cfg["data_dir"], "train", cfg["block_size"], cfg["batch_size"], seed=cfg["seed"])
    return tuple(t.to(device) for t in loader.next_batch())


def batch_text(cfg):
    """The tokens of one timed step: sequences x tokens, x micro-steps when grad_accum > 1."""
    accum = f" x {cfg['grad_accum']} micro-steps" if cfg["grad_accum"] > 1 else ""
    return f"{cfg['batch_size']}x{cfg['block_size']}{accum}"


def model_config(cfg, device):
    """The ModelConfig of cfg's model keys (a ValueError naming a bad size or combination), attn_impl 'auto' resolved
    for the device."""
    attn_impl = cfg["attn_impl"] if cfg["attn_impl"] not in ("auto", "all") else default_attn_impl(device)
    return ModelConfig.from_dict(cfg, attn_impl=attn_impl)


def make_step(cfg, model=None):
    """The model, optimizer and batch of one train step as train.py builds them, the step being grad_accum
    micro-steps on the batch and one optimizer step; returns (model, step, sync, batch). Given a model (built and
    compiled by an earlier call), the step is built around it: no second compilation."""
    device, dtype = resolve_device_dtype(cfg)
    if model is None:
        model = Transformer(model_config(cfg, device)).to(device, dtype=getattr(torch, cfg["param_dtype"]))
        if cfg["float8"]:
            model.use_float8_matmuls()
        if cfg["compile"]:
            model.compile_layers(mode=cfg["compile_mode"])
        model.set_activation_checkpointing(cfg["activation_checkpointing"])
    optimizer = optim.make_optimizer(model, cfg["optimizer"], cfg["param_dtype"], 1e-4, (0.9, 0.95), 0.1, 0, device,
                                     muon_lr=1e-3, compile=cfg["compile"])
    batch = synthetic_batch(cfg, device) if cfg["batch"] == "synthetic" else data_batch(cfg, device)
    x, y, doc_ids, cu_seqlens = batch
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        for _ in range(cfg["grad_accum"]):
            with autocast:
                if cfg["lean_loss"] == "on":
                    _, loss = model(x, y, doc_ids, cu_seqlens)
                else:
                    logits, _ = model(x, doc_ids=doc_ids, cu_seqlens=cu_seqlens)
                    with torch.profiler.record_function("head+loss"):
                        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
            (loss / cfg["grad_accum"]).backward()
        with torch.profiler.record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(cfg["warmup"]):
        step()
    sync()
    return model, step, sync, batch


def time_steps(step, sync, n):
    """Seconds per step over n steps, the device synchronized before the clock stops."""
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return (time.perf_counter() - t0) / n


def bench_train(cfg):
    """One record per optimizer of cfg's comma-separated list, measured in turn on the same compiled model."""
    device, _ = resolve_device_dtype(cfg)
    records, model = [], None
    for name in cfg["optimizer"].split(","):
        model, step, sync, (_, _, _, cu_seqlens) = make_step({**cfg, "optimizer": name}, model)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = time_steps(step, sync, cfg["steps"])
        # MFU counts only the attended part of the scores (sparse kernels, flex and flash, skip the rest), as
        # train.py does
        frac = model.attended_pairs(cu_seqlens).item() / (cfg["batch_size"] * cfg["block_size"] ** 2)
        flops_per_token = model.flops_per_token(cfg["block_size"], attn_fraction=frac)
        records.append({"what": "train", "attn_impl": model.config.attn_impl, "optimizer": name,
                        "lean_loss": cfg["lean_loss"], "params_M": round(model.num_params() / 1e6, 2),
                        **step_figures(cfg, device, seconds, flops_per_token), "attn_fraction": round(frac, 4),
                        "flops_per_token": round(flops_per_token)})
        del step  # the optimizer's state goes before the next one is built
    return records


def step_figures(cfg, device, seconds, flops_per_token):
    """batch, step time, tokens/s, TFLOP/s, MFU and peak memory of a step of cfg's batch that took seconds."""
    tokens = cfg["batch_size"] * cfg["block_size"] * cfg["grad_accum"]
    flops = flops_per_token * tokens
    peak = peak_tflops(cfg, device)
    return {"batch": batch_text(cfg), "step_ms": round(seconds * 1e3, 1), "tokens_per_s": round(tokens / seconds),
            "tflops": round(flops / seconds / 1e12, 3), "mfu": round(flops / seconds / 1e12 / peak, 4) if peak else None,
            "peak_mem_GB": round(peak_memory_gib(device), 2)}


def bench_reference(cfg):
    """nanoGPT's own model.py (the file at cfg's reference path) at cfg's shape, as its train.py runs it: its GPT
    (no bias, no dropout, tied head, vocabulary 50304), torch.compile of the whole model, its fused AdamW, bf16
    autocast, one causal sequence per row; timed by the loop that times smoltrain's step, on random tokens. Its FLOPs
    per token are counted as smoltrain's are (6 N + 12 L d T / 2, the causal half), so the MFUs compare."""
    import importlib.util
    path = Path(cfg["reference"])
    spec = importlib.util.spec_from_file_location("reference_model", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    device, dtype = resolve_device_dtype(cfg)
    B, T, accum = cfg["batch_size"], cfg["block_size"], cfg["grad_accum"]
    model = ref.GPT(ref.GPTConfig(block_size=T, vocab_size=50304, n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                                  n_embd=cfg["d_model"], dropout=0.0, bias=False)).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device)
    compiled = torch.compile(model) if cfg["compile"] else model
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, 50257, (B, T), generator=g).to(device) for _ in range(2))
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        for _ in range(accum):
            with autocast:
                _, loss = compiled(x, y)
            (loss / accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(cfg["warmup"]):
        step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = time_steps(step, sync, cfg["steps"])
    n_params = model.get_num_params()  # without the position embedding (no matmul); the tied head counted once
    flops_per_token = 6 * n_params + 12 * cfg["n_layer"] * cfg["d_model"] * T * 0.5
    return [{"what": "reference", "model": f"nanoGPT {path}", "optimizer": "adamw (fused)",
             "params_M": round(n_params / 1e6, 2), **step_figures(cfg, device, seconds, flops_per_token),
             "flops_per_token": round(flops_per_token)}]


# --what=profile: where a step's time goes. Ranges named in the code (model.py's forward and make_step above) take
# precedence; everything else is sorted by kernel or op name.
PROFILE_RANGES = ("head+loss", "optimizer")
PROFILE_PATTERNS = [  # (category, regex on the lower-cased kernel or op name), first match wins
    ("attention", r"flash|flex|attention|fmha|sdpa|varlen"),
    ("matmul", r"gemm|nvjet|cutlass|xmma|cublas|\bmm\b|addmm|bmm|matmul|linear|triton_tem_fused_mm|_mm_"),
    ("optimizer", r"adam|optimizer|foreach"),
    ("norms+elementwise", r"."),
]


def profile_category(name, ranges):
    if ranges:
        return ranges[0]
    lowered = name.lower()
    return next(cat for cat, pattern in PROFILE_PATTERNS if re.search(pattern, lowered))


def bench_profile(cfg):
    """torch.profiler over `steps` steps after warm-up: device time of every CUDA kernel (CPU time of every op
    on a CPU), each put in one category by the named range it ran under or by its name."""
    from torch.profiler import ProfilerActivity, profile
    device, _ = resolve_device_dtype(cfg)
    _, step, sync, _ = make_step(cfg)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        wall_us = time_steps(step, sync, cfg["steps"]) * cfg["steps"] * 1e6
    events = prof.events()
    times, by_name, items = {}, {}, timed_items(events, device)
    for name, us, op in items:
        ranges = []
        while op is not None:  # the named ranges this ran under, innermost first
            if op.name in PROFILE_RANGES:
                ranges.append(op.name)
            op = op.cpu_parent
        category = profile_category(name, ranges)
        times[category] = times.get(category, 0.0) + us
        by_name[(name, category)] = by_name.get((name, category), 0.0) + us
    spans = [(e.time_range.start, e.time_range.end) for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    launches = len(spans) if device == "cuda" else len(items)
    total = sum(times.values()) or 1.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    # Gaps: the share of the profiled time when nothing ran, i.e. the device waited for the host to launch (CUDA:
    # from the first kernel's start to the last one's end; CPU: the Python and dispatch time between ops). The
    # profiler slows the host down, so on CUDA this is an upper bound of the gaps in an unprofiled step.
    busy, span = (busy_and_span(spans) if device == "cuda" else (total, wall_us))
    return {"what": "profile", "time": "device (CUDA kernels)" if device == "cuda" else "CPU (self time of ops)",
            "steps": cfg["steps"], "step_ms": round(total / 1e3 / cfg["steps"], 2),
            "kernels_per_step": round(launches / cfg["steps"]),
            "gaps_pct": round(max(0.0, 100 * (1 - busy / span)), 1) if span > 0 else None,
            "share_pct": {c: round(100 * times.get(c, 0.0) / total, 1)
                          for c in ("matmul", "attention", "head+loss", "norms+elementwise", "optimizer")},
            "top": [{"name": name[:90], "category": cat, "ms_per_step": round(us / 1e3 / cfg["steps"], 3),
                     "pct": round(100 * us / total, 1)} for (name, cat), us in top]}


def timed_items(events, device):
    """(name, microseconds, the CPU op it ran under) of everything a profile timed. On CUDA: each kernel and copy,
    as listed under the CPU op that launched it (FunctionEvent.kernels: torch 2.11's kernel events carry no link
    back to their op), and the device time that no op launched (NCCL's kernels, say) as one more item. On a CPU:
    each op's self time."""
    cpu = torch.autograd.DeviceType.CPU
    if device != "cuda":
        return [(e.name, e.self_cpu_time_total, e) for e in events if e.device_type == cpu]
    items = [(k.name, k.duration, e) for e in events if e.device_type == cpu for k in e.kernels]
    device_us = sum(e.time_range.end - e.time_range.start for e in events
                    if e.device_type == torch.autograd.DeviceType.CUDA)
    unclaimed = device_us - sum(us for _, us, _ in items)
    return items + ([("(device time launched by no profiled op)", unclaimed, None)] if unclaimed > 0 else [])


def busy_and_span(intervals):
    """(time covered by at least one of the (start, end) intervals, time from the first start to the last end)."""
    busy, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            busy, reach = busy + end - start, end
        elif end > reach:
            busy, reach = busy + end - reach, end
    return busy, (max(e for _, e in intervals) - min(s for s, _ in intervals)) if intervals else 0.0


def print_profile(record):
    print(f"{record['time']} per step: {record['step_ms']} ms, over {record['steps']} profiled steps; "
          f"{record['kernels_per_step']} {'kernels' if 'CUDA' in record['time'] else 'ops'} per step; "
          f"idle between them {record['gaps_pct']}% of the time")
    print("share: " + " | ".join(f"{c} {p}%" for c, p in record["share_pct"].items()))
    print(f"top kernels/ops:\n{'ms/step':>9} {'%':>5}  {'category':<17} name")
    for row in record["top"]:
        print(f"{row['ms_per_step']:>9} {row['pct']:>5}  {row['category']:<17} {row['name']}")


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
    step = run_child(cfg, {"what": "train", "lean_loss": "on"})[0]
    return {"what": "loader", "batch": f"{cfg['batch_size']}x{cfg['block_size']}", "batch_ms": round(seconds * 1e3, 2),
            "tokens_per_s": round(cfg["batch_size"] * cfg["block_size"] / seconds),
            "step_ms": step["step_ms"], "share_of_step_pct": round(100 * seconds * 1e3 / step["step_ms"], 4)}


def bench_prepare(cfg):
    import pyarrow.parquet as pq
    import prepare
    if not cfg["source"] or not Path(cfg["source"]).is_dir():
        raise SystemExit(f"bench.py: --what=prepare needs --source=DIR, a local dir laid out like the hub repo "
                         f"(got {cfg['source']!r})")
    files = [f for f in sorted(Path(cfg["source"]).glob("*/train-*.parquet")) if f.parent.name in prepare.SUBSETS]
    texts = [t for f in files for t in pq.read_table(f, columns=[prepare.text_column(f"{f.parent.name}/{f.name}")])
             .column(0).to_pylist() if t]
    enc = prepare.get_encoding()
    t0 = time.perf_counter()
    n_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=1))
    single = n_tokens / (time.perf_counter() - t0)
    workers = os.cpu_count()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--source", cfg["source"], "--out", out,
                        "--workers", str(workers), "--val-docs", "0"], check=True, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
    return {"what": "prepare", "documents": len(texts), "tokens": n_tokens, "workers": workers,
            "prepare_tokens_per_s": round(n_tokens / seconds), "prepare_seconds": round(seconds, 2),
            "tokenizer_1proc_tokens_per_s": round(single)}


# --what=tasks without eval_tasks: a multiple-choice task of HellaSwag's shape (a context of about 60 words, 4 endings of
# about 20; HellaSwag's validation examples: ~45-word contexts and ~20-word endings), written as a local lm-eval task
TASK_WORDS = ("the water light plant energy cell student history city river stone cloud number book music "
              "garden method system result value change process animal forest science").split()


def write_shaped_task(folder, n_examples):
    import random

    import downstream
    rng = random.Random(0)
    words = lambda n: " ".join(rng.choice(TASK_WORDS) for _ in range(n))  # noqa: E731
    docs = os.path.join(folder, "docs.jsonl")
    with open(docs, "w") as f:
        for _ in range(n_examples):
            f.write(json.dumps({"ctx": words(60), "endings": [words(20) for _ in range(4)], "label": 0}) + "\n")
    downstream.write_task(folder, "hellaswag_shaped", docs, "multiple_choice", "{{ctx}}", "{{label}}", "{{endings}}")


def bench_tasks(cfg):
    """What eval_tasks costs: downstream.score, as train.py runs it, on the config's model (fresh weights: the cost does
    not depend on them) in batches of batch_size x block_size, over cfg's eval_tasks (at most eval_tasks_limit
    examples each), or, with none set, a HellaSwag-shaped local task of eval_tasks_limit (default 200) examples."""
    try:
        import downstream
    except ImportError as e:
        raise SystemExit(f"bench.py: {e}") from None
    from tokenizer import TokenizerError, load_tokenizer
    device, dtype = resolve_device_dtype(cfg)
    try:
        enc = load_tokenizer()
    except TokenizerError as e:
        raise SystemExit(f"bench.py: {e}") from None
    model = Transformer(model_config(cfg, device)).to(device, dtype=getattr(torch, cfg["param_dtype"]))
    if cfg["compile"]:
        model.compile_layers(mode=cfg["compile_mode"])
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    with tempfile.TemporaryDirectory() as folder:
        names, path, limit = cfg["eval_tasks"], cfg["eval_tasks_path"], cfg["eval_tasks_limit"]
        if not names:
            limit = limit or 200
            write_shaped_task(folder, limit)
            names, path = "hellaswag_shaped", folder
        try:
            tasks = downstream.load_tasks(names, path)
        except downstream.TaskError as e:
            raise SystemExit(f"bench.py: {e}") from None
        lm = downstream.ModelLM(model, enc, cfg["block_size"], cfg["batch_size"], device, autocast)
        scores = downstream.score(lm, tasks, limit)
    examples, seconds, tokens = scores["eval_tasks_examples"], scores["eval_tasks_s"], scores["eval_tasks_tokens"]
    return {"what": "tasks", "tasks": names, "params_M": round(model.num_params() / 1e6, 2),
            "batch": f"{cfg['batch_size']}x{cfg['block_size']}", "examples": examples,
            "requests": scores["eval_tasks_requests"], "tokens": tokens, "seconds": round(seconds, 2),
            "ms_per_example": round(1e3 * seconds / examples, 1), "tokens_per_s": round(tokens / seconds)}


def run_child(cfg, changes):
    """One measurement in a fresh process (its own peak memory); returns its JSON records (one per optimizer)."""
    args = [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}" for k, v in {**cfg, **changes}.items()
            if v is not None]
    proc = subprocess.run([sys.executable, "-m", "tools.bench", *args, "--json=True"], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return [{"error": (proc.stderr.strip().splitlines() or ["failed"])[-1], **changes}]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def header(cfg):
    device, dtype = resolve_device_dtype(cfg)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = peak_tflops(cfg, device)
    compiled = f"{cfg['compile']}" + (f" (mode {cfg['compile_mode']})" if cfg["compile"] else "")
    return (f"device: {name} | torch {torch.__version__} | dtype {dtype}{' + FP8 matmuls' if cfg['float8'] else ''}"
            f" | compile {compiled}"
            + (f" | MFU peak {peak} TFLOP/s (bf16 dense)" if peak else "")
            + "\nFLOPs per token = 6 * (body params + vocab * d_model) + 12 * n_layer * d_model * T * attn_fraction")


def bench_memory(cfg):
    """Predicted per-rank peak memory of a train step (memory_estimate.py) against gpu_gb; on CUDA also the measured peak of
    real steps at this config (one rank: the FSDP figures of more ranks are predicted only)."""
    device, _ = resolve_device_dtype(cfg)
    # the prediction is for a GPU: dtype 'auto' means bf16 there, whatever this machine's default
    dtype = cfg["dtype"] if cfg["dtype"] != "auto" else "bfloat16"
    record = {"what": "memory", "config": f"{cfg['family']} L{cfg['n_layer']} d{cfg['d_model']}",
              "batch": f"{cfg['batch_size']}x{cfg['block_size']}", "parallel": cfg["parallel"],
              "param_dtype": cfg["param_dtype"], "dtype": dtype, "optimizer": cfg["optimizer"],
              "act_ckpt": cfg["activation_checkpointing"] or "none",
              **memory_estimate.predict({**cfg, "dtype": dtype}, cfg["ranks"])}
    if device == "cuda" and record["ranks"] == 1:
        measured = run_child(cfg, {"what": "train", "steps": 2, "warmup": 1})[0]
        record["measured_peak_GB"] = measured.get("peak_mem_GB", measured.get("error"))
    budget = cfg["gpu_gb"] - cfg["reserve_gb"]
    record["verdict"] = (f"{'fits' if record['predicted_peak_GB'] <= budget else 'does not fit'}: predicted peak "
                         f"{record['predicted_peak_GB']:.2f} GB of {cfg['gpu_gb']:g} GB ({cfg['reserve_gb']:g} GB "
                         f"reserved)")
    return record


def main():
    choices = {**settings.CHOICES, **BENCH_CHOICES}  # every train.py key is accepted
    choices["attn_impl"] += ("all",)
    del choices["optimizer"]  # a comma-separated list: checked below
    cfg = configure({**settings.DEFAULTS, **BENCH_DEFAULTS}, sys.argv[1:], choices=choices)
    optimizers = cfg["optimizer"].split(",")
    wrong = [o for o in optimizers if o not in settings.CHOICES["optimizer"]]
    if wrong or not optimizers:
        raise SystemExit(f"bench.py: optimizer={cfg['optimizer']!r}: {', '.join(map(repr, wrong))} is not one of "
                         f"{', '.join(settings.CHOICES['optimizer'])} (a comma-separated list measures each in turn)")
    if cfg["what"] == "reference" and not Path(cfg["reference"]).is_file():
        raise SystemExit(f"bench.py: --what=reference needs --reference=PATH, nanoGPT's model.py (git clone "
                         f"https://github.com/karpathy/nanoGPT; got {cfg['reference']!r})")
    if len(optimizers) > 1 and cfg["what"] != "train":
        raise SystemExit(f"bench.py: optimizer={cfg['optimizer']!r}: a list of optimizers is for --what=train; "
                         f"--what={cfg['what']} takes one")
    try:
        resolve_device_dtype(cfg)
        recompute_interval(cfg["activation_checkpointing"])
        if cfg["float8"]:
            check_float8(resolve_device_dtype(cfg)[0])
    except ValueError as e:
        raise SystemExit(f"bench.py: {e}") from None
    try:
        model_config(cfg, resolve_device_dtype(cfg)[0])
    except ValueError as e:
        raise SystemExit(f"bench.py: bad model config: {e}") from None
    if cfg["grad_accum"] < 1:
        raise SystemExit(f"bench.py: grad_accum={cfg['grad_accum']} must be >= 1 (micro-steps per optimizer step)")
    if cfg["doc_len"] < 0:
        raise SystemExit(f"bench.py: doc_len={cfg['doc_len']} must be >= 0 (0: one causal sequence per row)")
    if cfg["memory_limit_gb"] < 0:
        raise SystemExit(f"bench.py: memory_limit_gb={cfg['memory_limit_gb']} must be >= 0 (0: no limit)")
    sweeps = {"attn_impl": [a for a in ATTN_IMPLS if available(a, cfg)] if cfg["attn_impl"] == "all" else None,
              "lean_loss": ["off", "on"] if cfg["lean_loss"] == "all" else None}
    if cfg["dry_run"]:  # everything above resolved; nothing measured
        device, dtype = resolve_device_dtype(cfg)
        print(json.dumps({"what": cfg["what"], "dry_run": True, "device": device, "dtype": dtype,
                          "config": f"{cfg['family']} L{cfg['n_layer']} d{cfg['d_model']}",
                          "batch": batch_text(cfg),
                          "sweeps": {k: v for k, v in sweeps.items() if v}}))
        return
    limit_memory(cfg)
    if cfg["what"] == "train" and any(sweeps.values()):
        combos = [{}]
        for key, values in sweeps.items():
            if values:
                combos = [{**c, key: v} for c in combos for v in values]
        records = [record for c in combos for record in run_child(cfg, c)]
    else:
        try:
            records = measure(cfg)
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if not is_out_of_memory(e):
                raise
            device, dtype = resolve_device_dtype(cfg)
            raise SystemExit("bench.py: " + memory_estimate.out_of_memory_message(
                {**cfg, "device": device, "dtype": dtype}, f"a step of {batch_text(cfg)}")) from None
    if cfg["json"]:
        for r in records:
            print(json.dumps(r))
        return
    print(header(cfg))
    if cfg["what"] == "profile":
        return print_profile(records[0])
    verdict = records[0].pop("verdict", None)
    keys = list(dict.fromkeys(k for r in records for k in r))
    rows = [[str(r.get(k, "")) for k in keys] for r in records]
    widths = [max(len(k), *(len(row[i]) for row in rows)) for i, k in enumerate(keys)]
    print(" | ".join(k.ljust(w) for k, w in zip(keys, widths)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths)))
    if verdict:
        print(verdict)  # the last line: 'fits: ...' or 'does not fit: ...'


def measure(cfg):
    """The records of cfg's measurement (--what), in this process."""
    if cfg["what"] in ("train", "reference"):
        return (bench_train if cfg["what"] == "train" else bench_reference)(cfg)
    what = {"loader": bench_loader, "prepare": bench_prepare, "profile": bench_profile, "memory": bench_memory,
            "tasks": bench_tasks}
    return [what[cfg["what"]](cfg)]


def limit_memory(cfg):
    """memory_limit_gb on CUDA: the allocator refuses to go past that many GiB, so a config that passes here fits a
    GPU of that size (less the CUDA context, which the fraction does not count)."""
    device, _ = resolve_device_dtype(cfg)
    if cfg["memory_limit_gb"] and device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cfg["memory_limit_gb"] * 2**30 / total))


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
