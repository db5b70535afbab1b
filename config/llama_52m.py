# Small Llama-style model, 52.0M parameters (26.2M without the embedding): pre-RMSNorm, SwiGLU, GQA 8:2, RoPE,
# tied embeddings.
#   python train.py config/llama_52m.py
family = "llama"
vocab_size = 50304
n_layer = 10
n_head = 8           # head dim 64
n_kv_head = 2
d_model = 512
d_ff = 1280
rope_theta = 10000.0
norm_eps = 1e-6
qk_norm = False
tie_embeddings = True
