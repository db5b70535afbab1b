"""
Pretrain a small LLM on SmolLM-Corpus: one device (CPU included) or all GPUs of a node with DDP.

Single device (the GPU if there is one, else the CPU):
    python train.py config/smoke.py
All 8 GPUs of one node:
    torchrun --standalone --nproc_per_node=8 train.py config/deepone.py --lr=1e-4
Chosen GPUs of one node (here 3 of them):
    CUDA_VISIBLE_DEVICES=0,1,3 torchrun --standalone --nproc_per_node=3 train.py config/deepone.py
Check a configuration without training (prints config, model size, tokens per step, LR, planned steps):
    python train.py config/deepone.py --dry_run=True

Configuration: settings.py's defaults (every key and what it means), then the config files and --key=value
overrides on the command line, in order (configurator.py). Reads data_dir (written by prepare.py). Writes
out_dir/ckpt-NNNNNNNN.pt (the newest keep_last of them; see checkpoint.py) and out_dir/log.jsonl, one JSON object a
line: training records {"step", "loss" (mean over ranks and micro-steps), "lr", "grad_norm", "tokens_per_sec", "mfu",
...}, validation records {"step", "tokens", "val_loss/<subset>", "val_bpb/<subset>"}, with sample_interval text
samples {"step", "samples": [{"prompt", "greedy", "sampled"}]}, and at each launch {"step", "run": {"device",
"backend", "parallel", "dtype", "attn_impl", ...}}, the resolved settings. A resume drops the records of steps after
its checkpoint, so the file reads as one run (python -m tools.plot draws them).

Reading order: settings and their checks; the plan; the process group; resume; data; model and optimizer; the
helpers of a step and of what falls due after it; the loop, which opens with the step.

Stopping: SIGTERM or SIGINT (Ctrl-C) on any rank makes every rank finish its step, save a checkpoint and exit 0; run
the same command again to continue (init_from='auto' resumes from the newest checkpoint in out_dir). torchrun forwards
a signal it gets to the workers and kills them 30 s later: give a large model more time with torchrun's
--shutdown-timeout=300. SIGQUIT (Ctrl+backslash) stops at once, without a checkpoint. A non-finite loss or gradient
norm stops the run at the next log, eval or save point with exit status 1, naming the step where it first
appeared, before anything is saved, and every save point first checks that the weights are finite: no checkpoint ever
holds NaN weights.
"""

import dataclasses
import datetime
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import checkpoint
import memory_estimate
import optim
import settings
from configurator import configure
from data import DataError, PackedLoader, check_vocab, count_tokens, count_val_batches, describe_mixture
from data import parse_mixture, read_meta, to_device
from model import ModelConfig, Transformer
from parallel import full_state_dict, full_tensor, load_optimizer_state, local, set_gradient_sync
from parallel import wrap as parallel_wrap
from machine import check_float8, gpu_peak_tflops, is_out_of_memory, peak_memory_gib, resolve
from tokenizer import TokenizerError, load_tokenizer, token_byte_lengths

# -----------------------------------------------------------------------------
# settings: settings.py's defaults (every key, what it means), then config files and --key=value overrides, in order
cfg = configure(settings.DEFAULTS, sys.argv[1:], choices=settings.CHOICES)
globals().update(cfg)  # every key is a name here, as in nanoGPT; cfg is saved in every checkpoint
# -----------------------------------------------------------------------------

ddp = "RANK" in os.environ  # launched by torchrun
rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
world_size = int(os.environ.get("WORLD_SIZE", 1))
master = rank == 0  # rank 0 logs, evaluates the averages and writes checkpoints


def print0(*args):
    if master:
        print(*args, flush=True)


def die(message):
    """Stop with one message (printed by rank 0; every rank reaches the same verdict) and exit status 1."""
    print0(f"train.py: {message}")
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(1)


@contextmanager
def out_of_memory_stops_the_run():
    """A step that runs out of memory stops the run with one message from each rank it happens on (one rank may run
    out alone: its message cannot wait for the others), not the allocator's traceback; nothing of it is saved."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(e):
            raise
        where = f"step {step + 1}" + (f" on rank {rank}" if ddp else "")
        message = memory_estimate.out_of_memory_message({**cfg, "device": device_type, "dtype": dtype}, where,
                                                        world_size)
        print(f"train.py: {message} Nothing of this step was saved; the last checkpoint is "
              f"{checkpoint.latest(out_dir) or '(none)'}.", flush=True)
        sys.stderr.flush()
        os._exit(1)  # not sys.exit: the other ranks may wait in a collective that an orderly exit would join


# device, precision, attention and distributed backends: what 'auto' means on this machine
try:
    settings.check(cfg)
    device, dtype, attn_impl, backend = resolve(device, dtype, param_dtype, attn_impl, backend)
    if float8:
        check_float8(device)
except ValueError as e:
    die(str(e))
activation_checkpointing = "none" if activation_checkpointing is None else activation_checkpointing
text_tokenizer = None
if sample_interval or eval_tasks:  # loaded now: a missing tokenizer stops the run before training, not at its first use
    try:
        text_tokenizer = load_tokenizer()
    except TokenizerError as e:
        die(f"{f'sample_interval={sample_interval}' if sample_interval else f'eval_tasks={eval_tasks!r}'} needs the "
            f"tokenizer: {e}")
task_suite = None
if eval_tasks:  # the tasks and their data are loaded now, so that a bad name or missing data stops the run here
    try:
        import downstream
    except ImportError as e:
        die(str(e))
    try:
        task_suite = downstream.load_tasks(eval_tasks, eval_tasks_path)
    except downstream.TaskError as e:
        die(str(e))
try:  # validation in bits per byte needs each token's length in UTF-8 bytes, read from the tokenizer once
    token_bytes = token_byte_lengths(text_tokenizer or load_tokenizer(), vocab_size)
except TokenizerError as e:
    token_bytes = None
    print0(f"warning: validation reports no val_bpb (bits per byte): {e}")
if wandb_log and master:
    try:
        import wandb
    except ImportError:
        die("wandb_log=True but wandb is not installed: pip install wandb, or drop --wandb_log=True")

try:
    model_config = ModelConfig.from_dict(cfg, attn_impl=attn_impl)
except (TypeError, ValueError) as e:
    die(f"bad model config: {e}")

# the plan: batch, learning rate, schedule length
tokens_per_step = batch_size * block_size * grad_accum * world_size
lr_scale = math.sqrt(batch_size * grad_accum * world_size)  # lr is for a global batch of one sequence
peak_lr, final_lr, peak_muon_lr = lr * lr_scale, min_lr * lr_scale, muon_lr * lr_scale
try:
    optim.check_settings(lr, min_lr, lr_scale, (beta1, beta2), muon_lr if optimizer == "muon" else 0.0, optimizer,
                         sharded=parallel == "fsdp")
except ValueError as e:
    die(str(e))
prepared = os.path.exists(os.path.join(data_dir, "meta.json"))  # a dry run may come before prepare.py
try:
    subsets = list(read_meta(data_dir)["subsets"]) if prepared else None
    if subsets:
        parse_mixture(mixture, subsets)
except DataError as e:
    die(str(e))
if train_tokens == 0 and not (dry_run and not prepared):
    train_tokens = count_tokens(data_dir, "train")  # one epoch; a dry run without data leaves it unknown
planned_steps = math.ceil(train_tokens / tokens_per_step)
log_every, eval_every, save_every, sample_every, tasks_every = (
    max(1, round(i * step_cadence)) for i in (log_interval, eval_interval, save_interval, sample_interval,
                                              eval_tasks_interval))


def describe_plan(model):
    accum = f" x grad_accum {grad_accum}" if grad_accum > 1 else ""
    stop = f", stopping early after step {max_steps}" if max_steps else ""
    n_params = model.num_params()
    shape = ("cosine to" if lr_schedule == "cosine" else
             f"constant, then a linear decay over the last {decay_frac:.0%} to")
    return "\n".join([
        f"model: {n_params / 1e6:.2f}M parameters, {model_config}",
        f"world size {world_size} on {device} ({f'{parallel} over {backend}' if ddp else 'no DDP'}), {dtype}"
        + (" with FP8 matmuls in the Blocks, " if float8 else ", ")
        + f"compile={compile}" + (f" (mode {compile_mode})" if compile else "")
        + f", weights {param_dtype}, activation checkpointing {activation_checkpointing}",
        f"tokens per step: {batch_size} seqs x {block_size} tokens{accum} x {world_size} ranks = {tokens_per_step:,}",
        f"data: {data_dir}, train documents drawn " + (describe_mixture(parse_mixture(mixture, subsets), subsets)
                                                       if subsets else f"as mixture={mixture!r} says"),
        f"lr: {lr:g} x sqrt({batch_size * grad_accum * world_size}) = {peak_lr:.3e} peak, min_lr -> {final_lr:.3e}"
        + (f"; muon_lr: {muon_lr:g} x sqrt({batch_size * grad_accum * world_size}) = {peak_muon_lr:.3e} peak"
           if optimizer == "muon" else ""),
        f"optimizer {optimizer}, parameter groups:\n"
        + optim.describe_groups(model, optimizer, weight_decay, peak_lr, peak_muon_lr),
        f"schedule: warmup {warmup_tokens:,} tokens ({math.ceil(warmup_tokens / tokens_per_step)} steps), {shape} "
        + (f"{train_tokens:,} tokens = {planned_steps} steps{stop}" if train_tokens else
           f"one epoch of {data_dir} (not prepared yet; or set --train_tokens){stop}"),
    ] + ([f"eval_tasks: {', '.join(task_suite.leaves)}" + (f", {eval_tasks_limit} examples each" if eval_tasks_limit
          else "") + (f", every {tasks_every} steps and" if eval_tasks_interval else ",") + " at the end of the schedule"]
         if task_suite else [])
        + ([f"warning: warmup_tokens={warmup_tokens:,} >= train_tokens: the LR never reaches its peak"]
           if 0 < train_tokens <= warmup_tokens else []))


if dry_run:
    if master:
        print("config:\n" + "\n".join(f"  {k} = {v!r}" for k, v in cfg.items()))
        with torch.device("meta"):  # sizes without allocating the weights
            meta_model = Transformer(model_config)
        if train_tokens == 0:
            print(f"(no prepared data in {data_dir}: train_tokens unknown)")
        print(describe_plan(meta_model))
    sys.exit(0)
if train_tokens == 0:
    die(f"train_tokens=0: the prepared data in {data_dir} has no train tokens")
try:
    check_vocab(data_dir, vocab_size)
except DataError as e:
    die(str(e))

if ddp:
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=dist_timeout_s) if dist_timeout_s else None
    dist.init_process_group(backend, device_id=torch.device("cuda", local_rank) if device == "cuda" else None,
                            timeout=timeout)
    # the per-step stop vote runs on CPU numbers over gloo, so it never waits for the GPU (see agree_to_stop)
    cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    # While rank 0 writes a checkpoint the other ranks wait in a barrier of this group (see save_checkpoint), not in
    # the next step's collectives, whose timeout (NCCL's watchdog: 10 minutes) a big or slow save could outlast.
    save_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=save_timeout_s))
device = f"cuda:{local_rank}" if device == "cuda" else "cpu"
device_type = "cuda" if device.startswith("cuda") else "cpu"
if device_type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
    torch.backends.cudnn.allow_tf32 = True
autocast = torch.autocast(device_type, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()
torch.manual_seed(seed)  # one seed: every rank builds the same initial weights
random.seed(seed)  # Python's and numpy's global RNGs too (their states are saved), so that two identical runs
np.random.seed(seed % 2**32)  # store identical checkpoints

# preemption: a signal only raises a flag; the ranks agree on stopping once per step (see the loop)
stop_signal = 0


def on_signal(signum, frame):
    global stop_signal
    stop_signal = signum  # no abort on a second SIGINT: torchrun forwards the Ctrl-C the workers already got


signal.signal(signal.SIGTERM, on_signal)
signal.signal(signal.SIGINT, on_signal)

# -----------------------------------------------------------------------------
# resume: find and check the checkpoint before building anything
os.makedirs(out_dir, exist_ok=True)
for partial in checkpoint.remove_partial_files(out_dir) if master else []:
    print(f"removed {partial}: a partial checkpoint that an interrupted save left (nothing reads it)")
try:
    ckpt_path = checkpoint.to_resume(out_dir, init_from)
except checkpoint.CheckpointError as e:
    die(str(e))
if ddp:  # every rank resumes from rank 0's checkpoint: on several nodes out_dir must be one shared directory
    seen = [None] * world_size
    dist.all_gather_object(seen, os.path.basename(ckpt_path) if ckpt_path else None)
    odd = next((r for r, name in enumerate(seen) if name != seen[0]), None)
    if odd is not None:
        die(f"the ranks see different checkpoints in out_dir={out_dir}: rank 0 {seen[0] or 'none'}, rank {odd} "
            f"{seen[odd] or 'none'}. With several nodes, out_dir must be one directory shared by all of them (e.g. "
            f"on a network filesystem), so that every rank resumes from the checkpoints rank 0 writes")
ckpt, weights_ckpt = (checkpoint.load(ckpt_path), None) if ckpt_path else (None, None)
if init_weights and ckpt:
    print0(f"init_weights ignored: resuming the run in {out_dir} from {ckpt_path}")
if init_weights and not ckpt:  # a new run from another run's weights: any parallel mode, param_dtype or optimizer
    try:
        ckpt_path = checkpoint.find(out_dir, init_weights, flag="init_weights")  # DIR/best: the best one of DIR
    except checkpoint.CheckpointError as e:
        die(str(e))
    weights_ckpt = checkpoint.load(ckpt_path)
    print0(f"starting from the weights of {ckpt_path} (init_weights={init_weights})")
try:  # a run can continue only its own model and optimizer; init_weights needs only the same model
    if ckpt or weights_ckpt:
        checkpoint.check_resumable(ckpt or weights_ckpt, ckpt_path, model_config, cfg, world_size,
                                   weights_only=ckpt is None)
except checkpoint.CheckpointError as e:
    die(str(e))

# -----------------------------------------------------------------------------
# data: each rank reads its own stream; with dispatch_batches rank 0 reads all of them and scatters the batches


def make_loaders(split, subset=None):
    """The loaders this rank reads: its own, or with dispatch_batches every rank's on rank 0 and none elsewhere."""
    ranks = (range(world_size) if master else []) if dispatch_batches else [rank]
    on = None if dispatch_batches else device
    return [PackedLoader(data_dir, split, block_size, batch_size, rank=r, world_size=world_size, seed=seed,
                         subset=subset, device=on, mixture=mixture) for r in ranks]


def next_batch(loaders):
    """This rank's (x, y, doc_ids, cu_seqlens): read locally, or received from rank 0 with dispatch_batches."""
    if not dispatch_batches:
        return loaders[0].next_batch()
    # One flat int64 buffer per rank: x, y, doc_ids, then cu_seqlens padded to the longest of this step's (its
    # length is a fixed function of the batch shape unless a batch has unusually many documents, see
    # data.segment_capacity). The ranks learn that length from rank 0 on the host group: no GPU sync.
    n_tokens = batch_size * block_size
    batches = [loader.next_batch() for loader in loaders] if master else None
    length = torch.tensor([max(b[3].numel() for b in batches) if master else 0])
    if ddp:
        dist.broadcast(length, src=0, group=cpu_group)
    length = int(length)
    chunks = [to_device(torch.cat([*(t.flatten() for t in b[:3]),
                                   F.pad(b[3].long(), (0, length - b[3].numel()), value=n_tokens)]), device)
              for b in batches] if master else None
    flat = torch.empty(3 * n_tokens + length, dtype=torch.long, device=device)
    if ddp:
        dist.scatter(flat, chunks, src=0)
    else:
        flat = chunks[0]
    x, y, doc_ids = flat[:3 * n_tokens].view(3, batch_size, block_size)
    return x, y, doc_ids, flat[3 * n_tokens:].int()


eot_token = read_meta(data_dir)["eot_token"]
if token_bytes is not None:
    token_bytes = token_bytes.to(device)
train_loaders = make_loaders("train")

# -----------------------------------------------------------------------------
# model, compile, DDP wrap or FSDP sharding, optimizer
try:
    model = Transformer(model_config)
except (ImportError, RuntimeError) as e:  # an attention backend this machine cannot run; the message says why
    die(str(e))
if ckpt or weights_ckpt:
    mismatch = checkpoint.weights_mismatch(model, (ckpt or weights_ckpt)["model"])
    if mismatch:  # same config, different parameters: model.py changed since the checkpoint
        die(f"checkpoint {ckpt_path} does not fit this model.py: {mismatch} (has model.py changed since?); "
            f"use the code that wrote it, or --init_from=scratch")
    model.load_state_dict((ckpt or weights_ckpt)["model"])  # the full weights, before any sharding; cast to param_dtype
    del weights_ckpt
model.to(device, dtype=getattr(torch, param_dtype))
if float8:
    model.use_float8_matmuls()
if compile:
    model.compile_layers(mode=compile_mode)  # in place, so state_dict keys keep their names
model.set_activation_checkpointing(activation_checkpointing)
ddp_model = parallel_wrap(model, parallel, device_type, local_rank, world_size, grad_accum, dtype) if ddp else model
opt = optim.make_optimizer(model, optimizer, param_dtype, peak_lr, (beta1, beta2), weight_decay, seed, device_type,
                           muon_lr=peak_muon_lr, compile=compile)  # after FSDP's sharding: it steps the shards
task_model = downstream.ModelLM(model, text_tokenizer, block_size, batch_size, device, autocast,
                             sharded=ddp and parallel == "fsdp", log=print0) if task_suite else None
if ckpt:
    run_settings = optim.group_settings(opt)
    load_optimizer_state(model, opt, ckpt["optimizer"], parallel if ddp else "ddp")
    for change in optim.restore_group_settings(opt, run_settings):  # the state is the checkpoint's, the settings ours
        print0(f"resume: optimizer {change} (this run's value applies)")

# -----------------------------------------------------------------------------
# what a checkpoint carries besides weights and optimizer: the step, the tokens seen (the LR schedule's position),
# every rank's data position and RNG states


step, tokens_seen = 0, 0
# the wall clock of the training steps alone (compilation included; evaluation, checkpoints and logging not), summed
# over resumes: the time it took to reach a validation loss
train_seconds = 0.0
best = None  # {"step", "val_loss"}: the evaluation with the lowest mean validation loss so far
loss_ema = None  # {"short", "long"}: moving averages of the logged train loss, for the divergence stop
if ckpt:
    step, tokens_seen = ckpt["step"], ckpt["tokens_seen"]
    best, loss_ema = ckpt.get("best"), ckpt.get("loss_ema")
    train_seconds = ckpt.get("train_seconds", 0.0)
    if "train_seconds" not in ckpt:
        print0("resume: the checkpoint does not record its training time; train_s counts from this launch")
    if restore_data_state:
        for loader in train_loaders:
            notes = loader.load_state_dict(ckpt["data_states"][loader.rank])
        for note in notes if train_loaders else []:
            print0(f"resume: {note}")
    if rank < len(ckpt["rng_states"]):  # (after a world size change, the new ranks keep their fresh seed)
        checkpoint.set_rng_state(ckpt["rng_states"][rank], cuda=device_type == "cuda")
    print0(f"resuming from {ckpt_path}: step {step}, {tokens_seen:,} tokens seen")
    del ckpt
planned_steps = step + math.ceil(max(0, train_tokens - tokens_seen) / tokens_per_step)  # batch size may have changed


def gather(obj):
    """Every rank's obj as a list on rank 0 (None elsewhere)."""
    if not ddp:
        return [obj]
    out = [None] * world_size if master else None
    dist.gather_object(obj, out, dst=0)
    return out


def save_checkpoint():
    if dispatch_batches:  # rank 0 holds every rank's loader
        data_states = [loader.state_dict() for loader in train_loaders] if master else None
    else:
        data_states = gather(train_loaders[0].state_dict())
    rng_states = gather(checkpoint.rng_state(cuda=device_type == "cuda"))
    model_state, opt_state = full_state_dict(model, opt, parallel if ddp else "ddp")  # FSDP: gathered on rank 0
    if master:
        state = {
            "model": {k.replace("_orig_mod.", ""): v for k, v in model_state.items()},
            "optimizer": opt_state, "step": step, "tokens_seen": tokens_seen, "train_seconds": train_seconds,
            "model_config": dataclasses.asdict(model_config), "config": cfg, "world_size": world_size,
            "data_states": data_states, "rng_states": rng_states, "best": best, "loss_ema": loss_ema,
        }
        try:
            path = checkpoint.save(state, out_dir, step, keep_last,
                                   keep_step=best["step"] if keep_best and best else None)
            print0(f"saved {path}")
            failure = None
        except checkpoint.SaveError as e:  # a full disk: the partial file is gone, the earlier checkpoints intact
            failure = str(e)
    if ddp:  # every rank waits here for rank 0's verdict (in a gloo group whose timeout outlasts a long save)
        verdict = [failure if master else None]
        dist.broadcast_object_list(verdict, src=0, group=save_group)
        failure = verdict[0]
    if failure:
        die(failure)


# -----------------------------------------------------------------------------
# eval helper, LR schedule, logging helpers


@torch.no_grad()
def evaluate():
    """Per subset, on fixed val blocks (a fresh val loader each time), over all ranks: the mean validation loss, and
    bits per byte: summed nats / (ln 2 x UTF-8 bytes) of the target tokens, <|endoftext|> targets left out of both
    sums (a document boundary is no text), comparable across tokenizers."""
    model.eval()
    losses = {}
    for subset in subsets:
        loaders = make_loaders("val", subset)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # mean losses, nats of text tokens, their bytes
        for _ in range(val_batches[subset]):
            x, y, doc_ids, cu_seqlens = next_batch(loaders)
            with autocast:
                _, per_token = model(x, y, doc_ids, cu_seqlens, per_token=True)
            sums[0] += per_token.mean()
            if token_bytes is not None:
                sums[1] += (per_token * (y != eot_token)).sum()  # a product, not a mask index: no sync
                sums[2] += token_bytes[y].sum()  # <|endoftext|> counts 0 bytes
        if ddp:
            dist.all_reduce(sums)
        loss_sum, nats, n_bytes = sums.tolist()
        losses[f"val_loss/{subset}"] = loss_sum / (val_batches[subset] * world_size)
        if token_bytes is not None:
            losses[f"val_bpb/{subset}"] = nats / (math.log(2) * max(n_bytes, 1))
    model.train()
    return losses


SAMPLE_PROMPTS = ("Photosynthesis is", "The history of the city", "To solve the equation")
SAMPLE_TOKENS = 24  # new tokens per continuation


@torch.no_grad()
def sample_text():
    """A greedy and a sampled (temperature 0.8, top 50) continuation of each of SAMPLE_PROMPTS. Every rank runs it
    (a sharded model needs them all), with a private RNG so that training's random stream is untouched; compiled
    layers run eagerly here, as generation changes shapes every token."""
    enc = text_tokenizer

    def text(ids):
        ids = ids[0].tolist()
        ids = ids[:ids.index(enc.eot_token)] if enc.eot_token in ids else ids  # a document ends at <|endoftext|>
        return enc.decode([t for t in ids if t < enc.n_vocab])

    eager = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
    model.eval()
    if ddp and parallel == "fsdp":
        model.unshard()  # generate() calls the embedding and head directly, not the root forward that gathers them
    samples = []
    with torch.random.fork_rng(devices=[device] if device_type == "cuda" else []), eager, autocast:
        torch.manual_seed(seed + step)
        for prompt in SAMPLE_PROMPTS:
            idx = torch.tensor([[enc.eot_token] + enc.encode_ordinary(prompt)], device=device)
            greedy = model.generate(idx, SAMPLE_TOKENS, temperature=0)[:, idx.size(1):]
            sampled = model.generate(idx, SAMPLE_TOKENS, temperature=0.8, top_k=50)[:, idx.size(1):]
            samples.append({"prompt": prompt, "greedy": text(greedy), "sampled": text(sampled)})
    if ddp and parallel == "fsdp":
        model.reshard()
    model.train()
    return samples


def lr_multiplier(tokens):
    """The LR of the step that starts after `tokens` tokens, as a multiple of each group's peak LR: a linear warmup
    over warmup_tokens, then 'cosine' down to min_lr / lr at train_tokens, or 'wsd' (warmup-stable-decay): 1 until
    the last decay_frac of train_tokens, then a linear decay to min_lr / lr. Counted in tokens, so a resume with
    another batch or world size keeps its place; a resume with a larger train_tokens during the stable phase moves
    the decay later, extending the run."""
    floor = min_lr / lr if lr > 0 else 0.0
    if tokens < warmup_tokens:
        return min(1.0, (tokens + tokens_per_step) / warmup_tokens)
    if lr_schedule == "wsd":
        decay_start = max(warmup_tokens, (1 - decay_frac) * train_tokens)
        progress = min(1.0, max(0.0, tokens - decay_start) / max(1, train_tokens - decay_start))
        return 1.0 - progress * (1.0 - floor)
    progress = min(1.0, (tokens - warmup_tokens) / max(1, train_tokens - warmup_tokens))
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)


def device_peak_flops():
    if peak_tflops:
        return peak_tflops * 1e12, f"peak_tflops={peak_tflops}"
    if device_type != "cuda":
        return None, "no MFU on the CPU"
    name = torch.cuda.get_device_name()
    tflops = gpu_peak_tflops(name)
    if tflops is None:
        return None, f"{name}: unknown peak, set --peak_tflops for MFU"
    return tflops * 1e12, f"{name}: {tflops} TFLOP/s dense bf16 peak"


def log_record(record):
    """Append one JSON object to out_dir/log.jsonl (and wandb, numbers only); rank 0 only."""
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    if wandb_log and "samples" not in record and "run" not in record:  # wandb.init has the config
        wandb.log(record, step=record["step"])


def start_log(step):
    """Keep the log.jsonl records of steps <= step: none for a fresh run; after a resume, one clean history."""
    path, kept = os.path.join(out_dir, "log.jsonl"), []
    if step and os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line)
                except (ValueError, KeyError):  # a line cut short by a crash
                    pass
    with open(path, "w") as f:
        f.writelines(kept)


def update_loss_ema(ema, loss):
    """The short (weight 0.1) and long (0.01) exponential moving averages of the train loss at log points, both
    starting at the first loss: a loss that climbs for a while lifts the short one above the long one."""
    if ema is None:
        return {"short": loss, "long": loss}
    return {"short": ema["short"] + 0.1 * (loss - ema["short"]), "long": ema["long"] + 0.01 * (loss - ema["long"])}


def fmt_time(seconds):
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) if seconds < 86400 else f"{seconds / 86400:.1f}d"


# -----------------------------------------------------------------------------
# one optimizer step


def forward_backward():
    """grad_accum micro-steps; DDP syncs gradients only in the last one. Returns this rank's mean loss and batches."""
    loss_sum = torch.zeros((), device=device)
    batches = []
    for micro in range(grad_accum):
        x, y, doc_ids, cu_seqlens = next_batch(train_loaders)
        if log_checksums:
            batches.append(x)
        sync = set_gradient_sync(ddp_model, parallel, micro == grad_accum - 1) if ddp else nullcontext()
        with sync:  # the forward too must be inside no_sync, or DDP still reduces
            with autocast:
                _, loss = ddp_model(x, y, doc_ids, cu_seqlens)
            (loss / grad_accum).backward()
        loss_sum += loss.detach().float() / grad_accum
        attended_sum.add_(model.attended_pairs(cu_seqlens))  # for MFU: the real documents' attention, on the device
    return loss_sum, batches


def agree_to_stop():
    """Every step: (stop, epoch) agreed by all ranks: a signal on any rank stops all of them after the same step.
    Host numbers over gloo only, so the step never waits on the GPU for it."""
    epochs = sum(loader.epoch for loader in train_loaders)  # with dispatch_batches, rank 0 holds every loader
    flags = torch.tensor([float(stop_signal > 0), float(epochs)], dtype=torch.float64)
    if ddp:
        dist.all_reduce(flags, group=cpu_group)
    stop, epochs = flags.tolist()
    return stop > 0, int(epochs) // world_size


def check_health(loss, first_bad_step, check_weights):
    """The run's health, at log, eval and save points only (the one device sync of those steps), over all ranks:
    stops the run (exit 1, nothing saved) when the loss or gradient norm of any step since the start was not finite
    (first_bad_step: the first such step, tracked on the device every step without a sync; 0 if none), or, when
    check_weights (save points: no checkpoint may hold NaN weights), when a weight is not finite. The loss and
    gradient norm are from before opt.step(), so only the weights show an update that overflowed them: one fused
    max|w| per parameter (NaN if it holds a NaN), then one isfinite over those; under FSDP each rank checks its own
    shards, skipping the empty ones of parameters with fewer rows than ranks. Returns the step's loss averaged over
    ranks and the attended (query, key) pairs of all ranks' batches since the last such point."""
    shards = [local(p) for p in model.parameters() if local(p).numel()] if check_weights else []
    weights_bad = (~torch.stack(torch._foreach_norm(shards, float("inf"))).isfinite().all() if shards else
                   torch.zeros((), dtype=torch.bool, device=loss.device))
    stats = torch.stack([loss.double(), attended_sum.double(), first_bad_step.double(), weights_bad.double()])
    if ddp:
        dist.all_reduce(stats[:2])
        dist.all_reduce(stats[2:], op=dist.ReduceOp.MAX)  # ranks agree: the gradient norm is the same everywhere
    loss_sum, attended, bad_step, weights_bad = stats.tolist()
    if bad_step or weights_bad:
        what = (f"non-finite loss or gradient norm at step {int(bad_step)} (loss now {loss_sum / world_size})"
                if bad_step else
                f"non-finite weights after step {step} (the update at lr {lr_now:.3e} overflowed them)")
        die(f"{what}; stopped without saving. The last good checkpoint is {checkpoint.latest(out_dir) or '(none)'}; "
            f"resume from it with a lower --lr or --grad_clip.")
    return loss_sum / world_size, int(attended)


# -----------------------------------------------------------------------------
# what falls due after a step: a log line, an evaluation, task scores, text samples, a checkpoint


def due_after(step, stop, epoch):
    """The names of what falls due after this step: 'log', 'eval', 'tasks', 'sample', 'save'. At the end of the run
    and on a stop: a log line and a checkpoint; at the end of the schedule: every evaluation too."""
    global epoch_seen
    done = step >= stop_step or tokens_seen >= train_tokens or stop
    new_epoch, epoch_seen = epoch_seen is not None and epoch > epoch_seen, epoch
    return {name for name, now in (
        ("log", step % log_every == 0 or done),
        ("eval", (eval_interval and step % eval_every == 0) or tokens_seen >= train_tokens),
        ("tasks", task_suite and ((eval_tasks_interval and step % tasks_every == 0) or tokens_seen >= train_tokens)),
        ("sample", sample_interval and (step % sample_every == 0 or done)),
        ("save", done or (save_strategy == "steps" and step % save_every == 0)
         or (save_strategy == "epoch" and new_epoch)),
    ) if now}


def log_progress(loss, grad_norm, attended, batches):
    """The step's log line and log.jsonl record (rank 0), then the divergence stop (every rank: loss is the mean over
    ranks, so they reach the same verdict)."""
    global loss_ema
    params = checkpoint.fingerprint(local(p) for p in model.parameters()) if log_checksums else None  # own shards
    sums = (gather(params), gather(checkpoint.fingerprint(batches))) if log_checksums else None
    if master:
        elapsed = time.time() - run_start
        tokens_per_sec = tokens_per_step * interval_steps / (time.time() - interval_start)
        # MFU counts the attended part of the scores only, from the batches' real documents
        attn_fraction = attended / (interval_steps * grad_accum * batch_size * world_size * block_size ** 2)
        flops_per_token = model.flops_per_token(block_size, attn_fraction)
        mfu = tokens_per_sec * flops_per_token / (world_size * peak_flops) if peak_flops else None
        eta = elapsed / steps_this_run * (stop_step - step)
        record = {"step": step, "loss": loss, "lr": lr_now, "grad_norm": grad_norm.item(), "tokens": tokens_seen,
                  "tokens_per_sec": tokens_per_sec, "mfu": mfu, "attn_fraction": attn_fraction,
                  "flops_per_token": flops_per_token, "peak_mem_gb": peak_memory_gib(device_type),
                  "elapsed_s": elapsed, "train_s": train_seconds, "eta_s": eta}
        if optimizer == "muon":
            record["muon_lr"] = peak_muon_lr * multiplier
        if sums:
            record["param_checksum"], record["batch_checksum"] = sums
        log_record(record)
        mfu_text = f" | mfu {mfu:.1%}" if mfu is not None else ""
        print(f"step {step}/{stop_step} | loss {loss:.4f} | lr {lr_now:.2e} | norm {grad_norm.item():.3f} | "
              f"{tokens_per_sec:,.0f} tok/s{mfu_text} | mem {record['peak_mem_gb']:.2f} GB | "
              f"{fmt_time(elapsed)} elapsed, eta {fmt_time(eta)}", flush=True)
    if divergence_margin:
        loss_ema = update_loss_ema(loss_ema, loss)
        if loss_ema["short"] - loss_ema["long"] > divergence_margin:
            die(f"the train loss is diverging at step {step}: its short moving average {loss_ema['short']:.4f} "
                f"(EMA 0.1) is more than divergence_margin={divergence_margin:g} above its long one "
                f"{loss_ema['long']:.4f} (EMA 0.01). Stopped without saving; the last checkpoint is "
                f"{checkpoint.latest(out_dir) or '(none)'}: resume from it with a lower --lr (or "
                f"--divergence_margin=0 to train on).")


def evaluate_and_keep_best():
    """Validation losses logged; True when keep_best makes this step's checkpoint the new best (saved now and kept
    through rotation). Every rank gets the same all-reduced numbers, so all agree on a new best."""
    global best
    losses = evaluate()
    if master:
        log_record({"step": step, "tokens": tokens_seen, "train_s": train_seconds, **losses})
        print("eval | " + " | ".join(f"{k} {v:.4f}" for k, v in losses.items()), flush=True)
    mean_val = sum(v for k, v in losses.items() if k.startswith("val_loss/")) / len(subsets)
    if not keep_best or (best is not None and mean_val >= best["val_loss"]):
        return False
    best = {"step": step, "val_loss": mean_val}
    print0(f"best | mean val loss {mean_val:.4f} at step {step}: kept as {checkpoint.path_for(out_dir, step)}")
    return True


def score_tasks():
    scores = downstream.score(task_model, task_suite, eval_tasks_limit)  # every rank: each scores its share
    if master:
        log_record({"step": step, "tokens": tokens_seen, **scores})
        print(f"eval_tasks | {downstream.summary(scores, task_suite)}", flush=True)


def log_samples():
    samples = sample_text()
    if master:
        log_record({"step": step, "samples": samples})
        for s in samples:
            print(f"sample | {s['prompt']!r} | greedy: {s['greedy']!r} | sampled: {s['sampled']!r}", flush=True)


# -----------------------------------------------------------------------------
# the loop
if max_steps and step >= max_steps:
    print0(f"already at step {step} >= max_steps={max_steps}; raise --max_steps (or set 0) to continue")
if tokens_seen >= train_tokens:
    print0(f"the schedule is complete ({tokens_seen:,} of {train_tokens:,} tokens); nothing to do")
peak_flops, peak_note = device_peak_flops()
stop_step = min(planned_steps, max_steps) if max_steps else planned_steps
if master:
    print(describe_plan(model))
    print(f"MFU: {peak_note}")
    space = checkpoint.space_warning(out_dir, checkpoint.expected_bytes(model, opt), keep_last, keep_best)
    if space:
        print(space, flush=True)
    start_log(step)
    # what this launch resolved the 'auto' settings to, for whoever reads the log (and tests) later
    log_record({"step": step, "run": {
        "world_size": world_size, "device": device, "parallel": parallel if ddp else None,
        "backend": backend if ddp else None, "dtype": dtype, "param_dtype": param_dtype, "attn_impl": attn_impl,
        "compile": compile, "compile_mode": compile_mode if compile else None, "float8": float8,
        "activation_checkpointing": activation_checkpointing, "n_params": model.num_params(),
        "tokens_per_step": tokens_per_step, "peak_lr": peak_lr, "stop_step": stop_step}})
    if wandb_log:
        wandb.init(project=wandb_project, name=wandb_run_name or os.path.basename(os.path.abspath(out_dir)), config=cfg)
val_batches = [count_val_batches(data_dir, subsets, block_size, batch_size, world_size, seed, eval_iters, print0)
               if master else None]
if ddp:
    dist.broadcast_object_list(val_batches, src=0)  # with dispatch_batches only rank 0 need read the data
val_batches = val_batches[0]
run_start = time.time()
steps_this_run, epoch_seen = 0, None
interval_steps, interval_start = 0, time.time()  # for tokens/s and MFU: training time only, not eval or checkpoints
first_bad_step = torch.zeros((), dtype=torch.long, device=device)  # on the device: tracked without a sync
attended_sum = torch.zeros((), dtype=torch.float64, device=device)  # attended pairs of this interval's batches, likewise
# No host-device sync between log points: the CPU runs ahead of the GPU, so the next batch is read, pinned and
# copied (non_blocking) while the current step's kernels run. Loss, health and grad norm are read only at log,
# eval and save points.
while step < stop_step and tokens_seen < train_tokens:
    # ---- one training step: grad_accum micro-steps forward and backward, the gradient clipped, the update ----
    multiplier = lr_multiplier(tokens_seen)
    lr_now = peak_lr * multiplier  # the AdamW (or Adafactor) LR, logged
    for group in opt.param_groups:
        group["lr"] = group["peak_lr"] * multiplier
    with out_of_memory_stops_the_run():
        loss, batches = forward_backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        grad_norm = full_tensor(grad_norm)  # FSDP: the norm is a DTensor
        healthy = torch.isfinite(loss) & torch.isfinite(grad_norm)
        first_bad_step = torch.where((first_bad_step == 0) & ~healthy, step + 1, first_bad_step)
        opt.step()  # a non-finite step still updates (no sync to know); it is caught below before anything is saved
    opt.zero_grad(set_to_none=True)
    step, tokens_seen, steps_this_run = step + 1, tokens_seen + tokens_per_step, steps_this_run + 1
    interval_steps += 1

    # ---- what falls due after it ----
    stop, epoch = agree_to_stop()
    due = due_after(step, stop, epoch)
    if not due:
        continue
    loss, attended = check_health(loss, first_bad_step, check_weights="save" in due)  # stops the run if unhealthy
    train_seconds += time.time() - interval_start  # the device is synchronized by now: the steps' real time
    if "log" in due:
        log_progress(loss, grad_norm, attended, batches)
    if "eval" in due and evaluate_and_keep_best():
        due.add("save")
    if "tasks" in due:
        score_tasks()
    if "sample" in due:
        log_samples()
    if "save" in due:
        save_checkpoint()
    interval_steps, interval_start = 0, time.time()
    attended_sum.zero_()
    if stop:
        print0(f"stopping on {signal.Signals(stop_signal).name if stop_signal else 'a signal on another rank'} "
               f"after step {step}; rerun the same command to continue")
        break

if wandb_log and master:
    wandb.finish()
if ddp:
    # Tear down together (no rank closes its connections while rank 0 still writes the last checkpoint), then leave
    # without Python's interpreter teardown: there, C++ objects of gloo still referenced by the DDP wrapper are
    # destroyed while the interpreter is half gone, which now and then aborts a rank that has finished all its work
    # ("terminate called without an active exception", exit -6; seen in CI; pytorch/pytorch#179291 describes it).
    # Everything is written and closed by now: the checkpoint is fsynced, log.jsonl closed, stdout flushed below.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
