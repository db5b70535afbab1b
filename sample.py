"""
Generate text from a trained checkpoint.

    python sample.py --out_dir=out/smoke --start="Photosynthesis is" --num_samples=3 --max_new_tokens=200
    python sample.py --out_dir=out/smoke                     # no start: begins a fresh document (<|endoftext|>)
    python sample.py --out_dir=out/smoke --start=FILE:prompt.txt
    python sample.py --out_dir=out/smoke --ckpt_path=best    # the lowest mean validation loss (train with keep_best)

Reads the newest checkpoint in out_dir (or ckpt_path) with torch.load(weights_only=True), rebuilds the model from
the model config stored in it, and prints num_samples continuations, each cut at the first <|endoftext|> it writes.
"""

import sys
from contextlib import nullcontext

import torch

import checkpoint
from configurator import configure
from model import ATTN_IMPLS
from machine import resolve
from tokenizer import TokenizerError, load_tokenizer

# -----------------------------------------------------------------------------
out_dir = "out"  # the run's directory: its newest checkpoint is used
ckpt_path = ""  # a particular checkpoint file instead; 'best': the run's best (keep_best), DIR/best that of DIR
start = ""  # the prompt; '' = start a fresh document; 'FILE:path' reads the prompt from a file
num_samples = 1
max_new_tokens = 200
temperature = 0.8  # 1.0 = the model's distribution; lower = more predictable
top_k = 200  # sample among the k most likely tokens; 0 = all
seed = 1337
device = "auto"  # 'auto' | 'cuda' | 'cpu'
dtype = "auto"  # 'auto' (bfloat16 autocast on CUDA and on CPUs with native bf16, as train.py) | 'bfloat16' | 'float32'
attn_impl = "auto"  # 'auto' (flex_attention on CUDA, sdpa on CPU) or a ModelConfig attn_impl
# -----------------------------------------------------------------------------
defaults = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, str))}
cfg = configure(defaults, sys.argv[1:],
                choices={"device": ("auto", "cuda", "cpu"), "dtype": ("auto", "bfloat16", "float32"),
                         "attn_impl": ("auto", *ATTN_IMPLS)})
globals().update(cfg)

try:  # an explicit attn_impl is checked where the model is built (checkpoint.load_model), naming the checkpoint
    device, dtype, auto_attn_impl, _ = resolve(device, dtype)
except ValueError as e:
    sys.exit(f"sample.py: {e}")
attn_impl = auto_attn_impl if attn_impl == "auto" else attn_impl
try:
    path = checkpoint.find(out_dir, ckpt_path)
except checkpoint.CheckpointError as e:
    sys.exit(f"sample.py: {e}")
if start.startswith("FILE:"):
    try:
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"sample.py: cannot read the prompt file of --start=FILE:{start[5:]} "
                 f"({e.strerror if isinstance(e, OSError) else e}); give an existing UTF-8 text file")
try:  # before the checkpoint, which may be large: offline without tiktoken's cache this fails
    enc = load_tokenizer()
except TokenizerError as e:
    sys.exit(f"sample.py: {e}")

model, ckpt = checkpoint.load_model(path, attn_impl)
model.to(device)
print(f"{path}: step {ckpt['step']}, {ckpt['tokens_seen']:,} tokens seen", file=sys.stderr)
del ckpt

prompt = [enc.eot_token] + enc.encode_ordinary(start)  # training documents open with <|endoftext|> too
idx = torch.tensor([prompt], dtype=torch.long, device=device)
autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bfloat16" else nullcontext()

torch.manual_seed(seed)
with torch.no_grad(), autocast:
    for i in range(num_samples):
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k or None)[0, len(prompt):]
        new = out.tolist()
        if enc.eot_token in new:
            new = new[:new.index(enc.eot_token)]
        new = [t for t in new if t < enc.n_vocab]  # ids of the padded vocab rows have no text
        print(start + enc.decode(new))
        print("---------------")
