"""
Export a smoltrain checkpoint to a Hugging Face transformers folder (weights, config and tokenizer), so that
AutoModelForCausalLM / AutoTokenizer, lm-evaluation-harness and everything built on transformers load it.

    python -m tools.export --out_dir=out/run --to=hf/run                  # the newest checkpoint of a run
    python -m tools.export --ckpt_path=out/run/ckpt-00001000.pt --to=hf/run
    python -m tools.export --out_dir=out/run --ckpt_path=best --to=hf/run   # the lowest mean val loss (keep_best)
    python -m tools.export --out_dir=out/run --to=hf/run --dtype=bfloat16 # half the size on disk

What it writes in --to: config.json, model.safetensors, generation_config.json, and the GPT-2 tokenizer (tokenizer.json,
vocab.json, merges.txt, tokenizer_config.json), built from tiktoken's own r50k_base ranks, nothing downloaded.
    llama (no q/k norm)  -> LlamaForCausalLM   the layouts match: RoPE pairs dim i with i + head_dim/2 in both,
    qwen3 (q/k norm)     -> Qwen3ForCausalLM   RMSNorm in fp32 with the same eps, same GQA, tied head kept tied
    deepone              -> no transformers class: the folder carries this repo's model.py and hf_modeling.py
                            (as modeling_smoltrain.py), registered for AutoModelForCausalLM, so load it with
                            trust_remote_code=True. One source of truth: the exported model runs model.py itself.
--target=auto picks as above; 'transformers' insists on a native class (refused for deepone); 'remote_code' exports
any family through model.py. Afterwards (check=True) the folder is loaded back with transformers and its fp32 logits
are compared with smoltrain's on a fixed text; a mismatch stops with exit status 1. Needs transformers and safetensors
(pip install -r requirements-extras.txt).
"""

import dataclasses
import json
import os
import shutil
import sys

import torch

import checkpoint
from configurator import configure
from model import ModelConfig, Transformer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the core: model.py
EOT = 50256  # <|endoftext|> of GPT-2's BPE (tiktoken r50k_base); every training document starts with it
CHECK_TEXT = ("Photosynthesis is the process by which green plants use light energy to make sugar from water and "
              "carbon dioxide. The oxygen we breathe is a by-product of it.")
TARGETS = ("auto", "transformers", "remote_code")


class ExportError(SystemExit):
    """One clear message and exit status 1, no traceback."""

    def __init__(self, message):
        super().__init__(f"export.py: {message}")


def need(package):
    try:
        return __import__(package)
    except ImportError:
        raise ExportError(f"the {package} package is missing: pip install -r requirements-extras.txt "
                          f"(or pip install transformers safetensors)") from None


# ---------------------------------------------------------------------------------------------------------------
# the checkpoint and the smoltrain model it holds

def load_model(out_dir, ckpt_path):
    """(smoltrain Transformer in fp32 eval mode, checkpoint path, step) from ckpt_path or out_dir's newest."""
    try:
        path = checkpoint.find(out_dir, ckpt_path)
    except checkpoint.CheckpointError as e:
        raise ExportError(str(e)) from None
    # sdpa runs everywhere and keeps documents apart; the training backend (flex, flash) is no part of the weights
    try:
        model, ckpt = checkpoint.load_model(path, attn_impl="sdpa")
    except SystemExit as e:
        raise ExportError(str(e)) from None
    return model.float(), path, ckpt["step"]


# ---------------------------------------------------------------------------------------------------------------
# which transformers class, its config.json and its weight names

# The ModelConfig fields that the Llama/Qwen3 configs express (attn_impl and loss_chunk_size change how, not what).
# A field outside this set that is not at its default is a setting those classes cannot express: auto exports it
# through model.py instead and --target=transformers refuses, so that a new model.py option is never exported
# silently wrong (and the logit check after writing backs this up).
NATIVE_MAPPED = {"family", "vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff",
                 "rope_theta", "norm_eps", "tie_embeddings", "qk_norm", "attn_impl", "loss_chunk_size"}


def pick_architecture(config, target):
    """'llama' | 'qwen3' | 'remote_code'. model.py's llama is Llama's layer exactly; with per-head q/k RMSNorm
    it is Qwen3's (no attention bias, no sliding window), whatever the family is called."""
    if target not in TARGETS:
        raise ExportError(f"--target={target!r} is unknown; choose one of {', '.join(TARGETS)}")
    defaults = ModelConfig(family=config.family)
    unmapped = sorted(f.name for f in dataclasses.fields(ModelConfig)
                      if f.name not in NATIVE_MAPPED and getattr(config, f.name) != getattr(defaults, f.name))
    if not any(config.layer_windows()):  # short_window follows block_size, and without S layers it changes nothing
        unmapped = [name for name in unmapped if name != "short_window"]
    native = None
    if config.family in ("llama", "qwen3") and not unmapped:
        native = "qwen3" if config.qk_norm else "llama"
    if target == "remote_code" or (target == "auto" and native is None):
        return "remote_code"
    if native is None:
        why = ("deepone's post-norm DeepNet layers (x = norm(alpha x + f(x)), ReLU-GLU) have no transformers class"
               if config.family == "deepone" else f"model settings {unmapped} have no transformers equivalent")
        raise ExportError(f"--target=transformers: {why}; use --target=remote_code (or auto), which exports it with "
                          f"this repo's model.py for trust_remote_code=True")
    return native


def native_config(config, arch, dtype):
    """config.json of LlamaForCausalLM / Qwen3ForCausalLM. Written with the rope_theta key (transformers 4) and
    rope_parameters (transformers 5), so both read the same RoPE base."""
    out = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen3ForCausalLM"],
        "model_type": arch,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": EOT,
        "eos_token_id": EOT,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if arch == "qwen3":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    return out


def native_weights(model, arch):
    """smoltrain state dict -> transformers names. No permutation: both rotate dim i with i + head_dim/2
    (model.apply_rope, transformers' rotate_half), q/k/v/o and the GLU are separate matrices in both, and
    nn.Linear stores [out, in] on both sides. A tied head is stored once, as the embedding."""
    sd = model.state_dict()
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    for i in range(model.config.n_layer):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = sd[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = sd[src + "ffn_norm.weight"]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[dst + f"self_attn.{name}.weight"] = sd[src + f"attn.{name}.weight"]
        if arch == "qwen3":
            out[dst + "self_attn.q_norm.weight"] = sd[src + "attn.q_norm.weight"]
            out[dst + "self_attn.k_norm.weight"] = sd[src + "attn.k_norm.weight"]
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            out[dst + f"mlp.{theirs}.weight"] = sd[src + f"ffn.{ours}.weight"]
    if not model.config.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def remote_code_config(config, dtype):
    """config.json of the trust_remote_code export: the ModelConfig as it is, plus the names transformers reads."""
    smoltrain = dataclasses.asdict(config)
    return {
        "architectures": ["SmoltrainForCausalLM"],
        "model_type": "smoltrain",
        "auto_map": {"AutoConfig": "modeling_smoltrain.SmoltrainConfig",
                     "AutoModelForCausalLM": "modeling_smoltrain.SmoltrainForCausalLM"},
        "smoltrain": smoltrain,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": EOT,
        "eos_token_id": EOT,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def remote_code_weights(model):
    """The smoltrain state dict under the wrapper's `model.` prefix; a tied head stored once, as the embedding."""
    sd = model.state_dict()
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")
    return {f"model.{k}": v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------------------------
# the GPT-2 tokenizer, rebuilt from tiktoken's ranks (no download; what prepare.py tokenized with)


def gpt2_encoding():
    """tiktoken's r50k_base (tokenizer.py), or one clear ExportError saying how to get it offline."""
    from tokenizer import TokenizerError, load_tokenizer
    try:
        return load_tokenizer()
    except TokenizerError as e:
        raise ExportError(str(e)) from None


def bytes_to_unicode():
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py; tiktoken.load's data_gym mapping)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def gpt2_vocab_and_merges():
    """(vocab {token string: id}, merges ["a b", ...] in rank order) equal to GPT-2's encoder.json and vocab.bpe.
    Each multi-byte token is the merge of the two parts that BPE, replayed with the lower ranks only, leaves
    (byte-exact with the published files, see shared/notes/torch-cpu.md section 6)."""
    enc = gpt2_encoding()
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.eot_token)}
    to_char = bytes_to_unicode()

    def text(token):
        return "".join(to_char[b] for b in token)

    def split(token, max_rank):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pairs = [(ranks.get(parts[i] + parts[i + 1], max_rank), i) for i in range(len(parts) - 1)]
            rank, i = min(pairs)
            if rank >= max_rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = split(token, rank)
            merges.append(f"{text(left)} {text(right)}")
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab["<|endoftext|>"] = enc.eot_token
    return vocab, merges


def write_tokenizer(to):
    """tokenizer.json (the tokenizers library's format, read by every transformers version), the slow
    tokenizer's vocab.json + merges.txt, and tokenizer_config.json naming GPT2Tokenizer."""
    need("tokenizers")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    vocab, merges = gpt2_vocab_and_merges()
    with open(os.path.join(to, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(to, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split regex
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True, normalized=False)])
    tok.save(os.path.join(to, "tokenizer.json"))
    eot = "<|endoftext|>"
    with open(os.path.join(to, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": eot, "eos_token": eot, "unk_token": eot,
                   "add_prefix_space": False, "add_bos_token": False, "model_max_length": 1_000_000,
                   "clean_up_tokenization_spaces": False, "errors": "replace"}, f, indent=2)
    with open(os.path.join(to, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": eot, "eos_token": eot, "unk_token": eot}, f, indent=2)


# ---------------------------------------------------------------------------------------------------------------
# writing and checking the folder

def write_folder(model, to, arch, dtype):
    need("safetensors")
    from safetensors.torch import save_file
    config = model.config
    if arch == "remote_code":
        hf_config, weights = remote_code_config(config, dtype), remote_code_weights(model)
        shutil.copyfile(os.path.join(ROOT, "model.py"), os.path.join(to, "model.py"))
        shutil.copyfile(os.path.join(HERE, "hf_modeling.py"), os.path.join(to, "modeling_smoltrain.py"))
    else:
        hf_config, weights = native_config(config, arch, dtype), native_weights(model, arch)
    with open(os.path.join(to, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(os.path.join(to, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": EOT, "eos_token_id": EOT, "pad_token_id": EOT}, f, indent=2)
    torch_dtype = getattr(torch, dtype)
    path = os.path.join(to, "model.safetensors")
    save_file({k: v.detach().to(torch_dtype).contiguous() for k, v in weights.items()}, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600; readable like the folder's other files
    write_tokenizer(to)


@torch.no_grad()
def check_folder(model, to, arch, dtype):
    """Load the folder with transformers and compare its fp32 logits with smoltrain's (weights rounded to the
    export dtype) on CHECK_TEXT. Returns the max abs difference; raises ExportError past the tolerance."""
    need("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a weight-loading bar per check is noise here
    ids = [EOT] + gpt2_encoding().encode_ordinary(CHECK_TEXT)
    remote = arch == "remote_code"
    hf_ids = AutoTokenizer.from_pretrained(to, trust_remote_code=remote)(CHECK_TEXT)["input_ids"]
    if hf_ids != ids[1:]:
        raise ExportError(f"the exported tokenizer encodes the check text differently from tiktoken:\n  {hf_ids}\n  "
                          f"{ids[1:]}")
    hf = AutoModelForCausalLM.from_pretrained(to, trust_remote_code=remote, dtype=torch.float32)
    idx = torch.tensor([ids[:model.config.block_size]])
    reference = model
    if dtype != "float32":  # compare with smoltrain at the same weight precision
        reference = Transformer(model.config).eval()
        reference.load_state_dict({k: v.to(getattr(torch, dtype)).float() for k, v in model.state_dict().items()})
    ours, theirs = reference(idx)[0], hf(idx).logits.float()
    diff = (ours - theirs).abs().max().item()
    tolerance = 1e-4 * max(1.0, ours.abs().max().item())  # fp32 rounding grows with the logits' size
    if not diff <= tolerance:
        raise ExportError(f"the exported model's logits differ from smoltrain's by {diff:.3g} (tolerance "
                          f"{tolerance:.3g}): the export is not faithful; {to} is left for inspection")
    return diff


def export(out_dir="out", ckpt_path="", to="", target="auto", dtype="float32", check=True, overwrite=False):
    """Write the transformers folder `to`; returns (architecture, checkpoint path, max logit difference or None)."""
    if not to:
        raise ExportError("say where to write: --to=hf/run")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ExportError(f"--dtype={dtype!r} is unknown; choose float32, bfloat16 or float16")
    if os.path.isdir(to) and os.listdir(to) and not overwrite:
        raise ExportError(f"--to={to} exists and is not empty; choose another folder or pass --overwrite=True")
    model, path, step = load_model(out_dir, ckpt_path)
    if model.config.vocab_size < EOT + 1:
        raise ExportError(f"vocab_size={model.config.vocab_size} cannot hold GPT-2's {EOT + 1} tokens")
    arch = pick_architecture(model.config, target)
    for package in ("transformers", "safetensors", "tokenizers"):
        need(package)
    if os.path.isdir(to) and overwrite:
        shutil.rmtree(to)
    os.makedirs(to, exist_ok=True)
    write_folder(model, to, arch, dtype)
    diff = check_folder(model, to, arch, dtype) if check else None
    return arch, path, step, diff


def main(argv):
    defaults = {"out_dir": "out", "ckpt_path": "", "to": "", "target": "auto", "dtype": "float32", "check": True,
                "overwrite": False}
    cfg = configure(defaults, argv, choices={"target": TARGETS, "dtype": ("float32", "bfloat16", "float16")})
    arch, path, step, diff = export(**cfg)
    how = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "remote_code": "SmoltrainForCausalLM (this repo's model.py; load with trust_remote_code=True)"}[arch]
    print(f"exported {path} (step {step}) to {cfg['to']} as {how}")
    if diff is not None:
        print(f"checked: transformers' fp32 logits match smoltrain's (max abs difference {diff:.2e})")
    remote = ",trust_remote_code=True" if arch == "remote_code" else ""
    print(f"evaluate: lm_eval --model hf --model_args pretrained={cfg['to']}{remote},add_bos_token=True "
          f"--tasks hellaswag,arc_easy")


if __name__ == "__main__":
    main(sys.argv[1:])
