"""
transformers wrapper around smoltrain's own model.py, for families with no transformers class (deepone).

export.py copies this file into an exported folder as modeling_smoltrain.py, next to a verbatim copy of model.py, and
config.json's auto_map points AutoConfig and AutoModelForCausalLM here, so that

    AutoModelForCausalLM.from_pretrained("hf/run", trust_remote_code=True)

runs exactly the code that trained the weights (one source of truth). Never imported by smoltrain itself: the
relative import below only resolves inside an exported folder.

attention_mask (left or right padding, as lm-evaluation-harness and generate() pass it) becomes document ids, so real
tokens never attend to padding; RoPE depends only on distances, so a left-padded row scores like an unpadded one.
generate() re-reads the whole sequence each step (no KV cache through transformers' cache objects).
"""

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .model import ModelConfig, Transformer


class SmoltrainConfig(PretrainedConfig):
    model_type = "smoltrain"

    def __init__(self, smoltrain=None, **kwargs):
        self.smoltrain = dict(smoltrain or {})  # model.ModelConfig's fields, as export.py wrote them
        config = ModelConfig(**self.smoltrain)
        # the names transformers and lm-evaluation-harness read
        self.vocab_size = config.vocab_size
        self.hidden_size = config.d_model
        self.num_hidden_layers = config.n_layer
        self.num_attention_heads = config.n_head
        self.num_key_value_heads = config.n_kv_head
        self.max_position_embeddings = config.block_size
        kwargs["tie_word_embeddings"] = config.tie_embeddings
        super().__init__(**kwargs)


class SmoltrainForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = SmoltrainConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.model = Transformer(ModelConfig(**config.smoltrain))
        self.post_init()

    def _init_weights(self, module):
        pass  # model.py initialises its own weights; from_pretrained then overwrites them all

    def get_input_embeddings(self):
        return self.model.tok_emb

    def get_output_embeddings(self):
        return self.model.lm_head

    def tie_weights(self, *args, **kwargs):
        if self.model.config.tie_embeddings:  # the checkpoint stores the shared matrix once, as the embedding
            self.model.lm_head.weight = self.model.tok_emb.weight

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        doc_ids = None
        if attention_mask is not None and not bool(attention_mask.all()):
            doc_ids = attention_mask.long()  # padding is a document of its own: nothing real attends to it
        logits, _ = self.model(input_ids, doc_ids=doc_ids)
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids[:, -self.model.config.block_size:],
                "attention_mask": None if attention_mask is None else attention_mask[:, -self.model.config.block_size:]}
