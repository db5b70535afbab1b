# Smoke run: a tiny DeepOne that trains on a 2-core CPU in a couple of minutes (the 50k-vocab head is most of it).
#   python train.py config/smoke.py
family = "deepone"
n_layer = 2
n_head = 4
d_model = 128
d_ff = 384
attn_impl = "sdpa"   # the CPU training backend
# training: 300k tokens = 293 steps of 4 x 256 tokens, the LR schedule's whole length (max_steps would only stop
# the run early). About 3-4 minutes on 2 idle CPU cores; one epoch of the standin data would be 2.1M tokens.
block_size = 256
batch_size = 4
train_tokens = 300_000
warmup_tokens = 20_000
lr = 1e-3            # for a batch of one sequence: x sqrt(4) = 2e-3 peak
eval_interval = 100
eval_iters = 10      # 10 x 4 x 256 = 10k val tokens per subset
log_interval = 10
save_interval = 50    # a checkpoint every ~40 s: stop it (Ctrl-C) or kill it and rerun the command to resume
compile = False
out_dir = "out/smoke"
