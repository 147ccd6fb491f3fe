"""`model.generate(...)`, given to GlmForCausalLM as a mixin so the decode loop never imports modeling.py."""

from __future__ import annotations

import torch

from .config import GenerationConfig
from .loop import decode_tokens
from .sampling import make_generator
from .stopping import StopStrings


class GenerationMixin:
    generation_config: GenerationConfig | None = None

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        streamer=None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        tokenizer=None,
        **kwargs,
    ) -> torch.Tensor:
        """Prompt + new tokens, (B, T + new); rows that stop early are padded with pad_token_id.

        Defaults come from the checkpoint's generation_config.json (else the model config); keyword arguments
        override them: max_new_tokens, max_length, do_sample, temperature, top_k, top_p, min_p,
        repetition_penalty, eos_token_id, pad_token_id, stop_strings (needs tokenizer=).
        `prompt_lookup_num_tokens` or `assistant_model` (a smaller GLM of the same vocabulary; with
        `num_assistant_tokens`) decode a single prompt speculatively (generation.speculate), output unchanged.
        `response_format` (needs tokenizer=) constrains every row's output: a JSON schema, or OpenAI's / vLLM's
        forms ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": ...}}, {"type":
        "regex", "regex": ...}, {"type": "choice", "choice": [...]}; generation.constrain); `logits_processor`:
        callables (history, logits) -> logits applied after the configured ones.
        """
        response_format = kwargs.pop("response_format", None)
        logits_processor = list(kwargs.pop("logits_processor", None) or [])
        assistant_model = kwargs.pop("assistant_model", None)
        if assistant_model is not None and assistant_model.config.vocab_size != self.config.vocab_size:
            raise ValueError(f"assistant_model has a vocabulary of {assistant_model.config.vocab_size} tokens, this "
                             f"model {self.config.vocab_size}: a draft must share the target's tokenizer")
        base = generation_config or self.generation_config or GenerationConfig.from_model_config(self.config)
        config = base.updated(**kwargs)
        input_ids, attention_mask = self._check_prompt(input_ids, attention_mask, config)
        max_new_tokens = self._room_for_new_tokens(input_ids.shape[1], config)
        if generator is None:
            generator = make_generator(seed, input_ids.device)
        stop_checks = []
        if config.stop_strings:
            if tokenizer is None:
                raise ValueError("stop_strings needs the tokenizer: generate(..., stop_strings=..., tokenizer=tok)")
            stop_checks.append(StopStrings(config.stop_strings, tokenizer, prompt_length=input_ids.shape[1]))
        constraints = self._constraints(response_format, tokenizer, config)
        if streamer is not None:
            if input_ids.shape[0] != 1:
                raise ValueError("a streamer streams one sequence: pass a batch of one prompt")
            streamer.put(input_ids.cpu())
        new_tokens = []
        try:
            for tokens, _, _ in decode_tokens(self, input_ids, attention_mask, config, max_new_tokens, generator,
                                              stop_checks, constraints, logits_processor, assistant_model):
                new_tokens.append(tokens)
                if streamer is not None:
                    streamer.put(tokens.cpu())
        finally:
            if streamer is not None:
                streamer.end()
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)

    def _constraints(self, response_format, tokenizer, config) -> list:
        """The grammar processor enforcing `response_format` (generation.constrain), or none."""
        if response_format is None:
            return []
        if tokenizer is None:
            raise ValueError("response_format needs the tokenizer: generate(..., response_format=..., tokenizer=tok)")
        from .constrain import as_constraint_spec, compile_constraint

        return [compile_constraint(tokenizer, as_constraint_spec(response_format), self.config.vocab_size,
                                   config.eos_token_ids).processor()]

    def _check_prompt(self, input_ids, attention_mask, config):
        if input_ids is None:
            raise ValueError("generate() needs input_ids (from the tokenizer)")
        if not isinstance(input_ids, torch.Tensor):
            try:
                input_ids = torch.as_tensor(input_ids)
            except (TypeError, ValueError, RuntimeError, OverflowError):
                raise ValueError("input_ids must be a (batch, seq) batch of integer token ids with rows of one "
                                 "length (pad them, with an attention_mask)") from None
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        input_ids = input_ids.long()
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor, got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.to(self.device)
        vocab = self.config.vocab_size
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab:
            raise ValueError(f"token id {hi if hi >= vocab else lo} is out of range for this model's vocabulary "
                             f"(vocab_size={vocab}); the tokenizer and the model do not match")
        if config.pad_token_id is not None and not 0 <= config.pad_token_id < vocab:
            raise ValueError(f"pad_token_id={config.pad_token_id} is not a token of this model (vocab_size={vocab}); "
                             "finished rows are filled with it")
        limit = self.config.max_position_embeddings
        if input_ids.shape[1] > limit:
            raise ValueError(f"the prompt has {input_ids.shape[1]} tokens but the model allows at most {limit} "
                             "(max_position_embeddings); shorten it")
        if attention_mask is None:
            pad = config.pad_token_id
            if pad is not None and pad not in config.eos_token_ids and bool((input_ids == pad).any()):
                attention_mask = (input_ids != pad).long()  # padding the caller left unmarked
        else:
            attention_mask = torch.as_tensor(attention_mask).to(self.device)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                                 f"{tuple(input_ids.shape)}")
            if bool((attention_mask.sum(-1) == 0).any()):
                raise ValueError("a row of attention_mask is all zeros: every prompt needs at least one token")
        return input_ids, attention_mask

    def _room_for_new_tokens(self, prompt_length: int, config: GenerationConfig) -> int:
        if config.max_new_tokens is not None:
            wanted = config.max_new_tokens
        else:
            wanted = (config.max_length or 20) - prompt_length
            if wanted < 1:
                raise ValueError(f"max_length={config.max_length} leaves no room after the {prompt_length}-token "
                                 "prompt; pass max_new_tokens instead")
        return max(1, min(wanted, self.config.max_position_embeddings - prompt_length))
