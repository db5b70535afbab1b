# DeepOne at about 1.7B parameters (1.67B: 24 layers of d_model 2048, 16 heads of dim 128, untied 50k head), set to
# train under DDP on GPUs of 24 GB: bf16 weights with optim.py's stochastic-rounding Muon and AdamW (at most 8 bytes
# a parameter instead of 16) and every layer's activations recomputed in backward. Predicted peak per GPU
# (tools/bench.py --what=memory): 14.5 GB at 2 x 4096 tokens with compile; measured on one H200 capped at 24 GiB:
# 10.3 GB (dev/LOG.md).
#   torchrun --standalone --nproc_per_node=8 train.py config/deepone_1b7.py
#   python -m tools.bench config/deepone_1b7.py --what=memory --gpu_gb=24
# With more GPU memory, param_dtype='float32' keeps fp32 master weights (16 bytes a parameter: 27 GB of state), or
# parallel='fsdp' shards that state over the ranks.
family = "deepone"
vocab_size = 50304
n_layer = 24
n_head = 16          # head dim 128
n_kv_head = 16
d_model = 2048
d_ff = 7168          # 3.5 d_model, a multiple of 256
rope_theta = 10000.0
norm_eps = 1e-6
qk_norm = True
tie_embeddings = False
# memory: see python -m tools.bench --what=memory
param_dtype = "bfloat16"
activation_checkpointing = "all"
batch_size = 2       # x 4096 tokens per GPU per micro-step
grad_accum = 4       # 32k tokens per GPU per step
block_size = 4096
lr = 3e-5            # AdamW (embedding, head, gains), for a batch of one sequence; x sqrt(8 x 8 GPUs) = 2.4e-4 peak
min_lr = 1.5e-6      # the schedule's end: 0.05 x, as train.py's default
muon_lr = 2.5e-3     # Muon (the Blocks' matrices): x sqrt(64) = 0.02 peak on 8 GPUs, nanochat's Muon LR at its batch
