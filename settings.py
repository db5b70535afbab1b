"""
Every key of a training run: its default, what it means and the values it may take. train.py starts from DEFAULTS,
then applies config files and --key=value overrides (configurator.py); the tools, which take the same keys, and
the tests read the same dict. check(cfg) refuses values that cannot run, one message naming them.

    import settings
    cfg = configure(settings.DEFAULTS, sys.argv[1:], choices=settings.CHOICES)
    settings.check(cfg)   # ValueError naming the bad values

The optimizer's values are checked by optim.check_settings, the model's by model.ModelConfig.
"""
from model import recompute_interval

# I/O
out_dir = "out"
init_from = "auto"  # 'scratch' | 'resume' | 'auto' (resume when out_dir has a checkpoint, else scratch)
save_strategy = "steps"  # periodic checkpoints: 'steps' (every save_interval) | 'epoch' (train data wrapped) | 'no'
save_interval = 1000  # steps between checkpoints; the end of the run, max_steps and SIGTERM always save
keep_last = 3  # checkpoints kept in out_dir; older ones are deleted
keep_best = False  # also keep the checkpoint of the lowest mean validation loss, saved at its evaluation
divergence_margin = 1.0  # stop (exit 1) when the train loss's short EMA (0.1) rises this far above its long EMA
#                          (0.01), at a log point; 0 = off
eval_interval = 1000  # steps between validation passes (0 = only at the end of the schedule)
eval_iters = 20  # validation batches per rank and subset (the same fixed blocks every time), at most one pass
log_interval = 10  # steps between log lines and log.jsonl records
step_cadence = 1.0  # multiplies log/eval/save intervals, e.g. 0.25 after making each step 4x larger
sample_interval = 0  # steps between greedy and sampled continuations of fixed prompts, printed and logged (0 = off)
eval_tasks = ""  # comma-separated lm-evaluation-harness tasks (or groups) scored on the live model, e.g.
#                  'hellaswag,arc_easy,piqa' (downstream.py; pip install lm-eval); '' = off
eval_tasks_interval = 0  # steps between task evaluations (0 = only at the end of the schedule)
eval_tasks_limit = 0  # examples per task, for a cheap signal; 0 = all of each task's evaluation split
eval_tasks_path = ""  # a directory of extra lm-eval task YAML files (local tasks); '' = lm-eval's own only
log_checksums = False  # log records carry per-rank parameter and batch checksums (for tests and debugging)
wandb_log = False  # also log to Weights & Biases (pip install wandb)
wandb_project = "smoltrain"
wandb_run_name = ""  # '' = the name of out_dir
dry_run = False  # print the resolved config and the plan, then exit
# data
data_dir = "data/smollm"
batch_size = 8  # sequences per device per micro-step
grad_accum = 1  # micro-steps per optimizer step, used to simulate larger batches
block_size = 4096  # tokens per sequence, and the model's maximum length
mixture = ""  # train documents per subset, e.g. 'cosmopedia-v2:0.7,fineweb-edu-dedup:0.3' (weights; a subset that
#               runs out starts a new epoch of its own); '' = in proportion to the documents each has left (data.py)
restore_data_state = True  # on resume, each rank's data stream continues where it stopped
init_weights = ""  # a checkpoint path, or DIR/best (DIR's keep_best checkpoint): start this (new) run from its
#                   weights only, in any mode; '' = from scratch
dispatch_batches = False  # rank 0 reads every rank's batches and sends them out (the same batches as reading locally)
# model: the fields of model.ModelConfig (block_size above is the model's too)
family = "deepone"
vocab_size = 50304  # GPT-2's 50257 tokens, padded to a multiple of 64
n_layer = 12
n_head = 12
n_kv_head = None  # None = n_head
d_model = 768
d_ff = None  # None = the default of ffn: 8/3 d_model rounded up to 256 (glu), 4 d_model (relu2)
ffn = "glu"  # 'glu' (the family's GLU: ReLU for deepone, SiLU for llama and qwen3) | 'relu2' (down(relu(up x)^2))
rope_theta = 10000.0
norm_eps = 1e-6
tie_embeddings = False
qk_norm = None  # None = the family's default
attn_impl = "auto"  # 'auto' (flex_attention on CUDA, sdpa on CPU) | 'eager' | 'sdpa' | 'flex_attention'
#                     | 'flash_attention_2'
loss_chunk_size = 4096  # rows of hidden states per chunk of the fused head + cross-entropy
logit_softcap = 0.0  # > 0: logits capped to c tanh(z / c) (Gemma 2; nanochat 15); 0: off
value_embeds = False  # a token embedding per alternate layer, gated into its attention values (nanochat's)
x0_mixing = False  # learned per-layer scales of the stream and of the normalised first embedding, and the backout
smear = False  # a learned, gated share of the previous token's embedding in each token's
window_pattern = "L"  # per-layer attention span, tiled over the layers: L = whole block, S = short_window (e.g. 'SSSL')
short_window = None  # tokens an S layer sees; None = block_size/4 rounded up to a multiple of 128
# optimizer
optimizer = "muon"  # 'muon' (optim.Muon on the Blocks' weight matrices, AdamW with lr on embedding, head, gains;
#                     the measured best, dev/LOG.md "Recipe") | 'adamw' (torch's, fused on CUDA; optim.AdamW for bf16
#                     weights) | 'adafactor' (optim.Adafactor)
lr = 1e-4  # peak LR for a global batch of ONE sequence; scaled by sqrt(batch_size * grad_accum * world_size)
muon_lr = 7e-3  # optimizer='muon': peak LR of the Blocks' matrices, same units and scaling as lr
min_lr = 5e-6  # LR at the end of the schedule, same units as lr; every group ends at its peak x min_lr / lr
# AdamW's betas and decoupled weight decay (decay on >= 2-D weights only). The defaults are those of the Muon recipe,
# where AdamW trains the embedding, head and gains: nanochat's beta1 0.8 and no decay, measured best (dev/LOG.md,
# "Recipe").
# optimizer='adamw' was measured with beta1 0.9 and weight_decay 0.1.
weight_decay = 0.0
beta1 = 0.8
beta2 = 0.95
grad_clip = 1.0  # clip the global gradient norm to this; 0 = no clipping
# LR schedule (in tokens, so that it survives a change of batch size or world size on resume)
lr_schedule = "wsd"  # 'wsd' (warmup-stable-decay: constant, then a linear decay to min_lr over the last decay_frac
#                     of train_tokens; ends level with cosine under Muon, dev/LOG.md "Recipe", and a stable-phase
#                     checkpoint can be continued) | 'cosine' (down to min_lr at train_tokens)
decay_frac = 0.5  # lr_schedule='wsd': the share of train_tokens that the final linear decay spans
warmup_tokens = 100_000_000  # linear warmup from 0 to the peak LR
train_tokens = 0  # tokens the schedule spans (it ends here); 0 = one epoch of the prepared train data
max_steps = 0  # stop after this step, with a checkpoint, without changing the schedule; 0 = run to the end
# DDP / FSDP
backend = "auto"  # 'auto' (nccl on CUDA, gloo on CPU) | 'nccl' | 'gloo'
dist_timeout_s = 0  # seconds a collective waits for a late rank before the run fails; 0 = torch's (NCCL 10 min)
save_timeout_s = 3600  # seconds the other ranks wait for rank 0 to write a checkpoint (gloo, not dist_timeout_s)
parallel = "ddp"  # under torchrun: 'ddp' (replicated) | 'fsdp' (FSDP2: weights, grads, optimizer sharded over ranks)
# system
device = "auto"  # 'auto' (cuda if available) | 'cuda' | 'cpu' (cpu = no accelerator)
dtype = "auto"  # 'auto' (bfloat16 autocast on CUDA and on CPUs with native bf16, else float32) | 'bfloat16' | 'float32'
compile = True  # torch.compile the model's layers (model.compile_layers, before the DDP wrap) and optimizer kernels
compile_mode = "default"  # torch.compile mode: 'default' | 'reduce-overhead' (CUDA graphs) | 'max-autotune'
#                           | 'max-autotune-no-cudagraphs'; 'default' until another one is measured faster
float8 = False  # FP8 matmuls in the Blocks' linear layers (torchao's float8 training; pip install torchao): a CUDA GPU
#                 of compute capability 8.9+ (H100, H200, L4, L40S, RTX 4090)
param_dtype = "float32"  # weights, grads, optimizer state: 'float32' (16 B/param) | 'bfloat16' (8 B/param, optim.py)
activation_checkpointing = None  # None or 'none' | 'all' | k (every k-th layer): recompute activations in backward
peak_tflops = 0.0  # one device's dense bf16 peak for MFU; 0 = look up the GPU's name
seed = 1337

# every name above is a key
DEFAULTS = {k: v for k, v in dict(globals()).items()
             if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
CHOICES = {
    "init_from": ("scratch", "resume", "auto"), "save_strategy": ("steps", "epoch", "no"),
    "device": ("auto", "cuda", "cpu"), "backend": ("auto", "nccl", "gloo"), "dtype": ("auto", "bfloat16", "float32"),
    "optimizer": ("adamw", "adafactor", "muon"), "parallel": ("ddp", "fsdp"), "param_dtype": ("float32", "bfloat16"),
    "lr_schedule": ("cosine", "wsd"), "ffn": ("glu", "relu2"),
    "attn_impl": ("auto", "eager", "sdpa", "flex_attention", "flash_attention_2"),
    "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


def check(cfg):
    """Raise a ValueError naming the values when the loop's own settings (sizes, intervals, fractions, timeouts,
    activation checkpointing) cannot run."""
    for minimum, names in ((1, ("batch_size", "grad_accum", "block_size", "keep_last", "eval_iters", "log_interval",
                                "save_interval")),
                           (0, ("max_steps", "train_tokens", "warmup_tokens", "eval_interval", "sample_interval",
                                "grad_clip", "eval_tasks_interval", "eval_tasks_limit"))):
        if any(cfg[k] < minimum for k in names):
            raise ValueError(f"{', '.join(f'{k}={cfg[k]}' for k in names if cfg[k] < minimum)}: {', '.join(names)} "
                             f"must be >= {minimum}")
    if not 0 < cfg["decay_frac"] <= 1:
        raise ValueError(f"decay_frac={cfg['decay_frac']} must be in (0, 1]: the share of train_tokens that "
                         f"lr_schedule='wsd' decays over")
    if cfg["divergence_margin"] < 0:
        raise ValueError(f"divergence_margin={cfg['divergence_margin']} must be >= 0 (0 turns the divergence stop "
                         f"off)")
    if cfg["step_cadence"] <= 0:
        raise ValueError(f"step_cadence={cfg['step_cadence']} must be > 0 (it multiplies the log, eval and save "
                         f"intervals)")
    if cfg["dist_timeout_s"] < 0 or cfg["save_timeout_s"] <= 0:
        raise ValueError(f"dist_timeout_s={cfg['dist_timeout_s']} must be >= 0 (0 = torch's default) and "
                         f"save_timeout_s={cfg['save_timeout_s']} > 0")
    recompute_interval(cfg["activation_checkpointing"])  # its own ValueError
