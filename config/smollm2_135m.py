# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json; Allal et al. 2025, arXiv 2502.02737): Llama, 30
# layers, d576, 9 query / 3 key-value heads (head dim 64), SwiGLU 1536, tied embeddings, RMSNorm eps 1e-5,
# pretrained on 2048-token sequences, so that a run can be put beside SmolLM2-135M's published scores
# (docs/reference.md, "Benchmarks during training"). The vocabulary is GPT-2's (50,304 padded) rather than SmolLM's 49,152-token one,
# so the model has 135.2M parameters instead of 134.5M. rope_theta 10000 is the 2048-token pretraining base (the
# published config's 100000 goes with its 8192-token extension).
# The optimizer settings SmolLM2 published where they apply: AdamW (0.9, 0.95), weight decay 0.01, gradient clip
# 1.0, warmup-stable-decay with a linear decay over the last 20%. --optimizer=muon trains it with smoltrain's recipe.
#   torchrun --standalone --nproc_per_node=8 train.py config/smollm2_135m.py
#   ... --eval_tasks=hellaswag,arc_easy,arc_challenge,piqa --eval_tasks_interval=2000 --eval_tasks_limit=500
family = "llama"
vocab_size = 50304
n_layer = 30
n_head = 9
n_kv_head = 3
d_model = 576
d_ff = 1536
rope_theta = 10000.0
norm_eps = 1e-5
qk_norm = False
tie_embeddings = True
block_size = 2048
batch_size = 16      # 16 x 2048 = 32,768 tokens per GPU per micro-step, as the default 8 x 4096
optimizer = "adamw"
beta1 = 0.9
beta2 = 0.95
weight_decay = 0.01
grad_clip = 1.0
lr_schedule = "wsd"
decay_frac = 0.2
