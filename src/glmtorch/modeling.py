"""The GLM model family: the math and nothing else (no files, no sampling, no processes).

GLM-4 is a Llama-style decoder. What differs from Llama, kept visible here:
  1. partial, interleaved RoPE: only the first `rotary_dim = head_dim * partial_rotary_factor` channels
     of each head are rotated (half of them for GLM-4), and they rotate in adjacent pairs (x0, x1),
     (x2, x3), ... instead of Llama's two halves;
  2. the MLP's gate and up projections are one fused `gate_up_proj` matrix, split by `chunk`;
  3. q/k/v projections carry a bias (`attention_bias`), o_proj never does; they run as one fused `qkv_proj`
     matrix [q | k | v] (one matrix product instead of three, as THUDM's checkpoints store it), while the
     state dict keeps transformers' q_proj / k_proj / v_proj names;
  4. the LM head is untied from the embedding by default.

GLM-4-0414 and GLM-Z1 (`glm4`) are the same decoder with two more RMSNorms per layer (DecoderLayer), switched on
by their config (Glm4Config.sandwich_norms); the Glm4* classes are these classes under that config.

Shapes: B batch, T new tokens, S key length (cached + new), H query heads, KV key/value heads, D head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import ATTENTION_BACKENDS, check_attention_backend
from .cache import DynamicCache, PagedKVCache, StaticCache, make_attention_mask
from .config import GlmConfig
from .losses import causal_lm_loss, sequence_classification_loss, token_classification_loss
from .outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)

ACTIVATIONS = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 and cast back before the scale, exactly as the reference does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the rotated part of each head, one frequency per adjacent channel pair."""

    def __init__(self, config: GlmConfig) -> None:
        super().__init__()
        dim = config.rotary_dim
        # Built on the CPU even when the model is built on meta: it is computed, never loaded.
        inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim))
        if config.rope_scaling and config.rope_scaling["rope_type"] == "linear":
            inv_freq = inv_freq / config.rope_scaling["factor"]
        # A plain attribute, not a buffer: `model.to(torch.bfloat16)` must not round the frequencies.
        self.inv_freq = inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != position_ids.device:  # follows the model to its device, once
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self.inv_freq  # (B|1, T, rotary_dim / 2)
        # Each frequency serves a pair of adjacent channels: [f0, f0, f1, f1, ...].
        cos = freqs.cos().to(dtype).repeat_interleave(2, dim=-1)[:, None]  # (B|1, 1, T, rotary_dim)
        sin = freqs.sin().to(dtype).repeat_interleave(2, dim=-1)[:, None]
        return cos, sin


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): a quarter turn of each adjacent pair."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `rotary_dim` channels of every head; the rest pass through unchanged."""
    rotary_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat([x_rot * cos + rotate_pairs(x_rot) * sin, x_pass], dim=-1)


class PackedRows:
    """The real tokens of a right-padded (B, T) batch, packed: prompts of different lengths prefilled in one pass
    (a server's burst) go through every matrix product as their N real tokens only, not as B x T rows of which
    the padding can be most (a served burst's 64 questions after their cached prefixes: 397 tokens in 1,024 rows).
    Only attention, which needs each token among its own sequence's, sees them in the (B, T) layout."""

    def __init__(self, lengths: torch.Tensor, T: int, device: torch.device) -> None:
        lengths = lengths.to(device)
        self.batch, self.time = lengths.shape[0], T
        keep = torch.arange(T, device=device)[None, :] < lengths[:, None]  # (B, T)
        self.padding = ~keep  # what attention skips (PagedKVCache.attend), made once for every layer
        self.index = keep.flatten().nonzero().squeeze(1)  # (N,) positions in the flattened batch, row by row
        self.last = lengths.cumsum(0) - 1  # (B,) each row's last token among the N

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (N, C)"""
        return x.reshape(self.batch * self.time, x.shape[-1]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> (B, T, C), zeros where the batch is padded"""
        out = x.new_zeros(self.batch * self.time, x.shape[-1])
        return out.index_copy_(0, self.index, x).view(self.batch, self.time, x.shape[-1])


class Attention(nn.Module):
    def __init__(self, config: GlmConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim ** -0.5
        self.dropout = config.attention_dropout
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.qkv_sizes = [q_size, kv_size, kv_size]  # rows of q, k, v in qkv_proj (this rank's, under TP)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.attend = ATTENTION_BACKENDS["sdpa"]
        self.register_state_dict_post_hook(_split_qkv_state)
        self.register_load_state_dict_pre_hook(_fuse_qkv_state)

    def rotate(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """(B, T, heads, D) -> (B, heads, T, D) with the rotary embedding applied."""
        cos, sin = rope
        return apply_rotary(x.transpose(1, 2), cos, sin)

    def forward(self, x, rope, mask, cache, cache_position, need_weights=False, packed=None):
        qkv = self.qkv_proj(x)
        if packed is not None:  # (N, C): back to the batch's (B, T) layout, which attention reads
            qkv = packed.unpack(qkv)
        B, T, _ = qkv.shape
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        # Head counts come from the weights, so a tensor-parallel shard (fewer heads per rank) runs as is.
        q = self.rotate(q.view(B, T, -1, self.head_dim), rope)  # (B, H, T, D)
        k = self.rotate(k.view(B, T, -1, self.head_dim), rope)  # (B, KV, T, D)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        if isinstance(cache, PagedKVCache) and not need_weights and cache.reads_in_place(q):
            padding = None if packed is None else packed.padding  # the padding's queries are skipped
            out, probs = cache.attend(self.layer_idx, q, k, v, cache_position, mask, self.scale, padding), None
        else:
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v, cache_position)  # (B, KV, S, D)
            dropout = self.dropout if self.training else 0.0
            out, probs = self.attend(q, k, v, mask, self.scale, dropout, need_weights)  # (B, T, H, D)
        out = out.reshape(B, T, -1)
        return self.o_proj(out if packed is None else packed.pack(out)), probs


# The state dict speaks transformers' names (q_proj, k_proj, v_proj): save_pretrained, load_state_dict and
# every tool that reads a state dict see the checkpoint layout, while the module runs the fused matrix.
# Parameters the model keeps fused that checkpoints store in parts, and the parts' order in the fused matrix:
# q, k and v run as one matrix product (THUDM and GGUF store them so too); transformers' checkpoints and
# state_dict() name them apart. The format tables (checkpoint/formats.py) read this; the model owns it.
STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
QKV_PARTS = STACKED["qkv_proj"]


def _split_qkv_state(module, state_dict, prefix, local_metadata) -> None:
    for leaf in ("weight", "bias", "scales"):  # scales: weight-only quantized layers
        fused = state_dict.pop(f"{prefix}qkv_proj.{leaf}", None)
        if fused is not None:
            for part, rows in zip(QKV_PARTS, fused.split(module.qkv_sizes, dim=0)):
                state_dict[f"{prefix}{part}.{leaf}"] = rows


def _fuse_qkv_state(module, state_dict, prefix, *args) -> None:
    for leaf in ("weight", "bias", "scales"):
        names = [f"{prefix}{part}.{leaf}" for part in QKV_PARTS]
        if all(n in state_dict for n in names):
            state_dict[f"{prefix}qkv_proj.{leaf}"] = torch.cat([state_dict.pop(n) for n in names], dim=0)


class MLP(nn.Module):
    def __init__(self, config: GlmConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # fused projection: [gate | up]
        return self.down_proj(up * self.act(gate))


class DecoderLayer(nn.Module):
    """x + attention(norm(x)), then x + mlp(norm(x)). GLM-4-0414 / GLM-Z1 ("sandwich" norms) also normalise each
    sub-layer's output before it joins the residual stream: x + norm(attention(norm(x))), x + norm(mlp(norm(x)))."""

    def __init__(self, config: GlmConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.sandwich_norms = config.sandwich_norms
        if self.sandwich_norms:
            self.post_self_attn_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_mlp_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, mask, cache, cache_position, need_weights=False, packed=None):
        h, probs = self.self_attn(self.input_layernorm(x), rope, mask, cache, cache_position, need_weights, packed)
        if self.sandwich_norms:
            h = self.post_self_attn_layernorm(h)
        x = x + h
        h = self.mlp(self.post_attention_layernorm(x))
        if self.sandwich_norms:
            h = self.post_mlp_layernorm(h)
        return x + h, probs


class GlmPreTrainedModel(nn.Module):
    """What every GLM model class shares: its config, weight init and the attention backend switch."""

    config_class = GlmConfig
    base_model_prefix = "model"

    def __init__(self, config: GlmConfig) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if config.pad_token_id is not None and not 0 <= config.pad_token_id < config.vocab_size:
            raise ValueError(f"GlmConfig.pad_token_id={config.pad_token_id} is outside the vocabulary "
                             f"(vocab_size={config.vocab_size}); set pad_token_id to a valid id or None")
        self.config = config
        self.attn_implementation = "sdpa"

    def init_weights(self) -> None:
        """Random init as the reference: N(0, initializer_range) matrices, zero biases, unit norms."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
                if module.padding_idx is not None:
                    module.weight.data[module.padding_idx].zero_()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def set_attn_implementation(self, name: str) -> None:
        name = check_attention_backend(name, self.device)
        for module in self.modules():
            if isinstance(module, Attention):
                module.attend = ATTENTION_BACKENDS[name]
        self.attn_implementation = name

    def tie_weights(self) -> None:
        """Point the LM head at the embedding matrix when the config ties them (no-op otherwise)."""

    def new_static_cache(self, batch_size: int, max_length: int) -> StaticCache:
        """A preallocated cache for this model (this rank's KV heads only, under tensor parallelism)."""
        return StaticCache(*self._static_cache_shape(batch_size, max_length), dtype=self.dtype, device=self.device)

    def static_cache_bytes(self, batch_size: int, max_length: int) -> int:
        """What new_static_cache(batch_size, max_length) would take, without taking it."""
        return StaticCache.nbytes(*self._static_cache_shape(batch_size, max_length), dtype=self.dtype)

    def new_paged_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """A pool of `num_blocks` KV blocks of `block_size` tokens (a server's; this rank's KV heads only)."""
        layers, _, kv_heads, _, head_dim = self._static_cache_shape(1, 1)
        return PagedKVCache(layers, num_blocks, kv_heads, block_size, head_dim, dtype=self.dtype, device=self.device)

    def kv_block_bytes(self, block_size: int) -> int:
        """What one block of new_paged_cache takes."""
        return self.static_cache_bytes(1, block_size)

    def _static_cache_shape(self, batch_size: int, max_length: int) -> tuple[int, int, int, int, int]:
        attention = next(m for m in self.modules() if isinstance(m, Attention))
        kv_heads = attention.qkv_sizes[1] // attention.head_dim
        return self.config.num_hidden_layers, batch_size, kv_heads, max_length, attention.head_dim

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())

    def get_input_embeddings(self) -> nn.Embedding:
        return self.get_submodule(self.base_model_prefix).embed_tokens if self.base_model_prefix else self.embed_tokens

    def gradient_checkpointing_enable(self) -> None:
        self.get_base_model().gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.get_base_model().gradient_checkpointing = False

    def get_base_model(self) -> "GlmModel":
        return self.get_submodule(self.base_model_prefix) if self.base_model_prefix else self


class GlmModel(GlmPreTrainedModel):
    """Embedding -> N x [norm -> attention (+KV cache) -> norm -> MLP] -> norm."""

    base_model_prefix = ""

    def __init__(self, config: GlmConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        packed: PackedRows | None = None,
        **kwargs,
    ):
        x = self._embed(input_ids, inputs_embeds)  # (B, T, hidden)
        B, T = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputing a layer would write its keys into the cache a second time
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = past_key_values
        past = None  # unknown when the caller places the tokens (cache_position): no sync on a cache length
        if cache_position is None:
            past = cache.get_seq_length() if cache is not None else 0
            cache_position = torch.arange(past, past + T, device=x.device)
        if position_ids is None:
            position_ids = cache_position if cache_position.dim() == 2 else cache_position[None]
        kv_length = cache.kv_length(T) if cache is not None else T
        mask = self._mask(attention_mask, cache_position, kv_length, past, B, T)

        rope = self.rotary_emb(position_ids, x.dtype)
        if packed is not None:
            x = packed.pack(x)  # (N, hidden): the layers' products take the real tokens only
        hidden_states: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training:
                x, probs = checkpoint(layer, x, rope, mask, cache, cache_position, bool(output_attentions), packed,
                                      use_reentrant=False)
            else:
                x, probs = layer(x, rope, mask, cache, cache_position, bool(output_attentions), packed)
            if output_attentions:
                attentions.append(probs)
        x = self.norm(x)
        if output_hidden_states:
            hidden_states.append(x)
        if cache is not None:
            cache.advance(T)
        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
        )
        return out if return_dict is not False else out.to_tuple()

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be (batch, seq, {self.config.hidden_size}), "
                                 f"got {tuple(inputs_embeds.shape)}")
            return inputs_embeds
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point \
                or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError("input_ids must be an integer tensor of token ids, got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}; "
                             "add a batch dimension with input_ids[None]")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: give at least one token")
        if not torch.compiler.is_compiling():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.config.vocab_size:
                bad = hi if hi >= self.config.vocab_size else lo
                raise ValueError(f"token id {bad} is out of range for this model's vocabulary "
                                 f"(vocab_size={self.config.vocab_size}); the tokenizer and the model do not match")
        return self.embed_tokens(input_ids)

    def _mask(self, attention_mask, cache_position, kv_length, past, B, T):
        """None (plain causal, the fast path of every backend) when nothing is padded and the new tokens
        are the last ones of a contiguous prefix; else an explicit boolean mask."""
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B:
                raise ValueError(f"attention_mask must be (batch, past + new tokens), batch {B}, "
                                 f"got {tuple(attention_mask.shape)}")
            if past is not None and attention_mask.shape[1] < past + T:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} positions but the cache "
                                 f"holds {past} and {T} are new: it must cover all {past + T}")
            if not torch.compiler.is_compiling() and bool(attention_mask.all()):
                attention_mask = None
        # (placed by the caller, T new tokens in a cache of T slots can only be slots 0..T-1: a fresh prefill)
        contiguous = cache_position.dim() == 1 and ((past is None and kv_length == T) or (
            past is not None and kv_length == past + T and (T == 1 or past == 0)))
        if attention_mask is None and contiguous:
            return None
        return make_attention_mask(cache_position, kv_length, attention_mask)


class GlmForCausalLM(GlmPreTrainedModel):
    def __init__(self, config: GlmConfig) -> None:
        super().__init__(config)
        self.model = GlmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        cache_position=None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states=None,
        output_attentions=None,
        return_dict=None,
        **kwargs,
    ):
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         cache_position, output_hidden_states, output_attentions, return_dict=True)
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int):
            h = h[:, -logits_to_keep:] if logits_to_keep > 0 else h  # 0 keeps every position
        else:
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)  # (B, T_kept, vocab)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels, num_items_in_batch=kwargs.get("num_items_in_batch"))
        result = CausalLMOutputWithPast(loss, logits, out.past_key_values, out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()

    def last_token_logits(self, input_ids, lengths, attention_mask, past_key_values, cache_position) -> torch.Tensor:
        """(B, vocab) fp32 logits at each row's last real token of a right-padded batch (row i's are at
        lengths[i] - 1): a server prefilling several prompts of different lengths at once. Where rows are padded,
        only the real tokens go through the layers' products (PackedRows); only the B last ones through the LM head."""
        B, T = input_ids.shape
        lengths = torch.as_tensor(lengths)
        shortest, longest = int(lengths.min()), int(lengths.max())
        if lengths.shape != (B,) or shortest < 1 or longest > T:
            raise ValueError(f"lengths must give each of the {B} rows between 1 and {T} real tokens, got "
                             f"{lengths.tolist()}")
        packed = PackedRows(lengths, T, input_ids.device) if B > 1 and shortest < T else None
        h = self.model(input_ids, attention_mask, past_key_values=past_key_values, cache_position=cache_position,
                       use_cache=True, return_dict=True, packed=packed).last_hidden_state
        last = h[packed.last] if packed is not None else \
            h[torch.arange(B, device=h.device), (lengths - 1).to(h.device)]
        return self.lm_head(last).float()


class GlmForSequenceClassification(GlmPreTrainedModel):
    """Scores the last real token of each row (the rightmost that is not padding)."""

    def __init__(self, config: GlmConfig) -> None:
        super().__init__(config)
        self.model = GlmModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         cache_position, output_hidden_states, output_attentions, return_dict=True)
        logits = self.score(out.last_hidden_state)  # (B, T, num_labels)
        B = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and B != 1:
            raise ValueError("a batch of more than one row needs config.pad_token_id to find each row's last token")
        if pad is None or input_ids is None:
            last = torch.full((B,), -1, device=logits.device)
        else:
            # Rightmost non-pad token; works for left and right padding alike.
            positions = torch.arange(input_ids.shape[1], device=logits.device)
            last = (positions * (input_ids != pad).to(logits.device, torch.long)).argmax(-1)
        pooled = logits[torch.arange(B, device=logits.device), last]  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = sequence_classification_loss(pooled, labels, self.config.num_labels, self.config.problem_type)
        result = SequenceClassifierOutputWithPast(loss, pooled, out.past_key_values, out.hidden_states,
                                                  out.attentions)
        return result if return_dict is not False else result.to_tuple()


class GlmForTokenClassification(GlmPreTrainedModel):
    def __init__(self, config: GlmConfig) -> None:
        super().__init__(config)
        self.model = GlmModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else 0.1
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=True)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None,
                output_hidden_states=None, output_attentions=None, return_dict=None, **kwargs):
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache,
                         cache_position, output_hidden_states, output_attentions, return_dict=True)
        logits = self.score(self.dropout(out.last_hidden_state))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = token_classification_loss(logits, labels)
        result = TokenClassifierOutput(loss, logits, out.hidden_states, out.attentions)
        return result if return_dict is not False else result.to_tuple()


MODEL_CLASSES = {
    cls.__name__: cls
    for cls in (GlmModel, GlmForCausalLM, GlmForSequenceClassification, GlmForTokenClassification)
}
