# DeepOne, smoltrain's default model: post-norm DeepNet layers, RoPE, q/k RMSNorm, ReLU-GLU, untied head.
# 125.3M parameters with the GPT-2 vocabulary (60.9M without the embedding and head); see model.py.
#   python train.py config/deepone.py
# attn_impl is left to the trainer: flex_attention on GPU, sdpa on CPU.
family = "deepone"
vocab_size = 50304
n_layer = 12
n_head = 10          # head dim 64
n_kv_head = 10
d_model = 640
d_ff = 1792          # 8/3 d_model, rounded up to a multiple of 256
rope_theta = 10000.0
norm_eps = 1e-6
qk_norm = True
tie_embeddings = False
