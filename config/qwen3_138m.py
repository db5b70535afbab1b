# Qwen3-style model, 137.8M parameters (99.1M without the embedding): pre-RMSNorm, SwiGLU, GQA 8:2, per-head q/k RMSNorm,
# rope_theta 1e6, tied embeddings.
#   python train.py config/qwen3_138m.py
family = "qwen3"
vocab_size = 50304
n_layer = 16
n_head = 8           # head dim 96
n_kv_head = 2
d_model = 768
d_ff = 2048
rope_theta = 1000000.0
norm_eps = 1e-6
qk_norm = True
tie_embeddings = True
