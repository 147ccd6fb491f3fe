"""`glmtorch.LLM`: batched generation in Python over the serving engine (vLLM's offline API, in its shape).

    from glmtorch import LLM, SamplingParams
    llm = LLM("path/to/checkpoint")                      # or LLM(model, tokenizer)
    outs = llm.generate(["Hello", "Hail"], SamplingParams(max_tokens=32, temperature=0))
    print(outs[0].outputs[0].text)
    llm.chat([{"role": "user", "content": "Hi"}])       # through the model's chat template

`SamplingParams(n=4)` makes four completions of each prompt (`outputs[k]`, seeded seed + k), and
`logprobs=True` fills each completion's `logprobs`. Every prompt goes to the engine at once; it runs them with
continuous batching (a finished request's slot takes the next prompt at once, prompts are prefilled several to a
pass), in the caller's thread. Each request keeps its own sampling parameters and seed, so a seeded request gives
the same text here, alone, or through the server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .engine import Event, Request, SamplingParams


@dataclass
class CompletionOutput:
    index: int  # of the prompt's n completions
    text: str
    token_ids: list[int]
    finish_reason: str | None
    # with SamplingParams(logprobs=True): per generated token {"token", "logprob"} (and "top_logprobs", a list of
    # those, with top_logprobs > 0); None when not asked for
    logprobs: list[dict] | None = None


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens the prefix cache supplied (not prefilled)


class LLM:
    def __init__(self, model, tokenizer=None, dtype: str = "auto", device: str | None = None,
                 quantize: str | None = None, max_num_seqs: int = 256, max_context: int | None = None,
                 prefix_caching: bool = True, speculative_tokens: int = 0,
                 kv_cache_memory: int | None = None) -> None:
        """`model`: a checkpoint (path or hub id), loaded with its tokenizer, or a loaded GlmForCausalLM (then
        `tokenizer` is required). Up to `max_num_seqs` prompts decode together, as many as the KV block pool
        (`kv_cache_memory` bytes) holds; a prompt starts from the longest prefix the pool still holds
        (`prefix_caching`), across calls too; greedy prompts check up to `speculative_tokens` tokens proposed by
        prompt lookup per step while few decode."""
        from ..fastpath import pack_weights

        if isinstance(model, (str, os.PathLike)):
            from .server import PACK_ROWS, load_for_serving

            model, loaded_tokenizer, _ = load_for_serving(os.fspath(model), dtype, device, quantize)
            tokenizer = tokenizer or loaded_tokenizer
            pack_weights(model, rows=min(max_num_seqs, PACK_ROWS))  # this model is ours, for inference only
        elif tokenizer is None:
            raise ValueError("LLM(model, tokenizer): a loaded model needs its tokenizer (or pass a checkpoint path)")
        from .server import build_engine

        self.model, self.tokenizer = model, tokenizer
        self.engine = build_engine(model, tokenizer, max_num_seqs, max_queue=2**31, max_context=max_context,
                                   thread=False, prefix_caching=prefix_caching,
                                   speculative_tokens=speculative_tokens, kv_cache_memory=kv_cache_memory)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool | None = None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. `prompts`: a string, a list of strings, or a list of token-id
        lists; `sampling_params`: one for all, or one per prompt (default: SamplingParams())."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts must be a string, token ids, or a non-empty list of either")
        texts = [p if isinstance(p, str) else None for p in prompts]
        ids = [self._encode(p, i) for i, p in enumerate(prompts)]
        params = self._params(sampling_params, len(ids))
        return self._run(texts, ids, params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | list[SamplingParams] | None = None,
             tools: list[dict] | None = None, use_tqdm: bool | None = None) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} messages) or to a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        ids = [self.tokenizer.apply_chat_template(c, tools=tools, add_generation_prompt=True) for c in conversations]
        return self._run([None] * len(ids), ids, self._params(sampling_params, len(ids)), use_tqdm)

    # -- the parts -----------------------------------------------------------------------------------------
    def _encode(self, prompt, i: int) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and all(type(t) is int for t in prompt):
            vocab = self.model.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise ValueError(f"prompts[{i}]: token ids must lie in [0, {vocab})")
            ids = list(prompt)
        else:
            raise ValueError(f"prompts[{i}] must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError(f"prompts[{i}] is empty")
        return ids

    def _params(self, given, n: int) -> list[SamplingParams]:
        given = given if given is not None else SamplingParams()
        params = given if isinstance(given, list) else [given] * n
        if len(params) != n:
            raise ValueError(f"{len(params)} sampling_params for {n} prompts: give one, or one per prompt")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params must be glmtorch.SamplingParams, got {type(p).__name__}")
        # checked here, before any prompt is queued (the engine checks each again as it is submitted), once per
        # object given (one for 10,000 prompts is one check); the copies are the engine's requests' own
        vocab = self.engine.model.config.vocab_size
        checked = {}
        for p in params:
            if id(p) not in checked:
                checked[id(p)] = p.checked(vocab)
        return [checked[id(p)] for p in params]

    def _run(self, texts, ids, params, use_tqdm) -> list[RequestOutput]:
        for i, (prompt, p) in enumerate(zip(ids, params)):
            if len(prompt) + p.max_tokens > self.engine.context:
                raise ValueError(f"prompts[{i}]: {len(prompt)} prompt tokens + max_tokens={p.max_tokens} exceed the "
                                 f"context of {self.engine.context} tokens")
        outputs = [RequestOutput(text, prompt) for text, prompt in zip(texts, ids)]
        # one request per completion: (prompt index, completion index, its params), completion k seeded seed + k
        jobs = [(i, k, p.for_choice(k)) for i, p in enumerate(params) for k in range(p.n)]
        pieces: list[list[str]] = [[] for _ in jobs]
        logprobs: list[list[dict]] = [[] for _ in jobs]
        errors: list[str] = []
        bar = tqdm(total=len(jobs), desc="Generating", unit="completion",
                   disable=None if use_tqdm is None else not use_tqdm)
        requests = []

        def emit_for(j: int):
            i, k, p = jobs[j]

            def emit(event: Event) -> None:
                logprobs[j] += event.token_logprobs
                if event.kind == "text":
                    pieces[j].append(event.text)
                    return
                if event.kind == "error":
                    errors.append(f"prompts[{i}]: {event.error}")
                r = requests[j]
                generated = r.tokens[len(r.prompt_ids):len(r.prompt_ids) + r.generated]
                outputs[i].outputs.append(CompletionOutput(k, "".join(pieces[j]), generated, event.finish_reason,
                                                           logprobs[j] if p.logprobs else None))
                outputs[i].num_cached_tokens = max(outputs[i].num_cached_tokens, event.cached_tokens)
                bar.update()
            return emit

        try:
            for j, (i, _, p) in enumerate(jobs):
                requests.append(Request(ids[i], p, emit_for(j)))
                self.engine.submit(requests[-1])
            self.engine.run(until_idle=True)
        except BaseException:  # Ctrl-C, say: nothing of this call may stay queued for the next one
            for r in requests:
                r.cancelled.set()
            self.engine.run(until_idle=True)  # drops them from the slots and the queue; decodes nothing
            raise
        finally:
            bar.close()
        if errors:
            raise RuntimeError("; ".join(errors[:5]))
        for out in outputs:
            out.outputs.sort(key=lambda c: c.index)  # in the order they finished until now
        return outputs
