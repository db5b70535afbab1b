"""
The tokenizer of smoltrain's data: GPT-2's BPE as tiktoken's r50k_base (50257 tokens, <|endoftext|> = 50256).
Used by prepare.py (to write shards), data.py (to check them) and sample.py (to encode prompts, decode samples).

    from tokenizer import TOKENIZER, TokenizerError, load_tokenizer
    enc = load_tokenizer()      # a tiktoken.Encoding, or TokenizerError saying how to get the file offline

tiktoken downloads the BPE ranks once (r50k_base.tiktoken, 835 KB, from openaipublic.blob.core.windows.net) and
caches them in $TIKTOKEN_CACHE_DIR (default: data-gym-cache under the temp dir), under the sha1 of the URL.
"""

TOKENIZER = "r50k_base"
URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
CACHE_NAME = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"  # sha1 of URL: the file name in tiktoken's cache


class TokenizerError(Exception):
    """The tokenizer could not be loaded (offline without a cached copy); the message says what to do."""


def load_tokenizer():
    import tiktoken
    try:
        return tiktoken.get_encoding(TOKENIZER)
    except Exception as e:  # requests' network errors, a bad cached file (ValueError), ...: many types
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        raise TokenizerError(
            f"tiktoken could not load the {TOKENIZER} tokenizer ({reason}). tiktoken must download it once, from "
            f"{URL}, and then caches it: connect once, or copy a cached copy (that file, named {CACHE_NAME} in "
            f"tiktoken's cache) into a directory and set TIKTOKEN_CACHE_DIR to it") from None


def token_byte_lengths(enc, vocab_size):
    """int64 tensor [vocab_size]: each token id's length in UTF-8 bytes; 0 for special tokens (<|endoftext|>) and
    for the ids past the tokenizer's vocabulary that a padded model vocabulary adds."""
    import torch
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    lengths = [0 if i in special else len(enc.decode_single_token_bytes(i)) for i in range(min(enc.n_vocab, vocab_size))]
    return torch.tensor(lengths + [0] * (vocab_size - len(lengths)), dtype=torch.int64)
