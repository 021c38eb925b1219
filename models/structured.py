"""Structured generation: greedy decoding that can only write an answer valid under a JSON schema.

The matching is llguidance's (Microsoft's grammar engine, one of the structured-output backends of
vLLM and SGLang): it turns a JSON schema into a grammar and, at each step, computes in Rust the set of
tokens of our own tokenizer that keep the answer valid. It needs no network and nothing but the
tokenizer, ships as one wheel without dependencies, and works on any vocabulary, the tiny preset's
byte-level one included. Its `llguidance.torch` helper is not used: it `torch.compile`s its mask
kernel, which would need a C compiler on every worker; the mask is applied here in a few tensor
operations instead. Ruled out without trying them here: xgrammar (its wheel requires Triton on Linux,
hundreds of MB on our CPU machines), outlines (a framework with its own model wrappers and many
dependencies), lm-format-enforcer and transformers-cfg (their token-level matching runs in Python).

Why any model's answer parses: decoding is greedy over the allowed tokens only, whitespace between
JSON tokens is not allowed, strings take no escapes and have a maximum length, arrays a fixed number of
items and integers a range, so the longest valid answer has a known number of bytes
(`max_answer_bytes`). Every token is at least one byte, so a budget of that many tokens plus one for
the end-of-sequence token always lets the answer finish: the model cannot run out of budget mid-answer,
however poor it is (the tiny preset's random weights included).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import llguidance
import llguidance.hf
import torch
from llguidance import LLMatcher
from transformers import LogitsProcessor, PreTrainedTokenizerFast, StoppingCriteria

logger = logging.getLogger(__name__)

#: The most bytes one character takes in UTF-8.
_UTF8_MAX = 4
#: How the answer is written: no whitespace between JSON tokens and no escape in strings (the schemas'
#: text patterns exclude the quotation mark and the backslash), so its longest form is known.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "json_allowed_escapes": ""}


def max_answer_bytes(schema: dict[str, Any]) -> int:
    """The most bytes a compact, escape-free JSON value valid under `schema` can take.

    Handles the schemas the text tasks use: objects whose properties are all required (and no others),
    arrays with `maxItems`, strings with `maxLength`, integers with `minimum` and `maximum`, booleans.
    Raises ValueError for a schema without such a bound (an answer that could run on forever).
    """
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        if schema.get("additionalProperties", True) is not False or set(schema.get("required", ())) != set(
            properties
        ):
            raise ValueError("an object's properties must all be required, and no others allowed")
        members = [len(json.dumps(name)) + 1 + max_answer_bytes(value) for name, value in properties.items()]
        return 2 + sum(members) + max(0, len(members) - 1)
    if kind == "array":
        if "maxItems" not in schema:
            raise ValueError("an array needs maxItems")
        items = schema["maxItems"]
        return 2 + items * max_answer_bytes(schema.get("items", {})) + max(0, items - 1)
    if kind == "string":
        if "maxLength" not in schema:
            raise ValueError("a string needs maxLength")
        return 2 + _UTF8_MAX * schema["maxLength"]
    if kind == "integer":
        if "minimum" not in schema or "maximum" not in schema:
            raise ValueError("an integer needs minimum and maximum")
        return max(len(str(schema["minimum"])), len(str(schema["maximum"])))
    if kind == "boolean":
        return len("false")
    raise ValueError(f"no length bound for a schema of type {kind!r}")


class JsonDecoding:
    """llguidance's view of one tokenizer (built once per tokenizer: about a second for Qwen's).

    Args:
        tokenizer: the model's fast tokenizer.
        vocab_size: the width of the model's logits (Qwen2.5-VL pads its vocabulary past the tokenizer's;
            the extra ids are never allowed).
        eos_token_ids: the ids that end an answer (the generation config's).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, vocab_size: int, eos_token_ids: Sequence[int]):
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids)
        )

    def budget(self, schema: dict[str, Any]) -> int:
        """The token budget under which any answer valid under `schema` finishes (see the module)."""
        return max_answer_bytes(schema) + 1

    def processor(self, schema: dict[str, Any]) -> SchemaLogitsProcessor:
        """A fresh logits processor for one answer under `schema`; ValueError for a schema it refuses."""
        grammar = LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise ValueError(f"the answer schema is not usable: {'; '.join(messages)}")
        # Silent: the matcher never sees a token it did not allow; `is_error` is checked instead.
        return SchemaLogitsProcessor(LLMatcher(self.tokenizer, grammar, log_level=0), self.vocab_size)


class SchemaLogitsProcessor(LogitsProcessor):
    """Masks every token that would make the answer invalid (one answer at a time: batch size 1).

    The first call sees the prompt; each later call first feeds the matcher the token chosen last.
    """

    def __init__(self, matcher: LLMatcher, vocab_size: int):
        self.matcher = matcher
        self._prompt_length: int | None = None
        self._words = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)
        self._bits: dict[torch.device, torch.Tensor] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != 1:
            raise ValueError("structured decoding writes one answer at a time (batch size 1)")
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
        elif not self.matcher.consume_token(int(input_ids[0, -1])):
            raise RuntimeError(f"the answer left its grammar: {self.matcher.get_error()}")
        self.matcher.unsafe_compute_mask_ptr(self._words.data_ptr(), self._words.numel() * 4)
        # 32 tokens per int32 word, token i at bit i % 32 of word i // 32 (llguidance's layout).
        device = scores.device
        if device not in self._bits:
            self._bits[device] = torch.arange(32, dtype=torch.int32, device=device)
        words = self._words.to(device, non_blocking=False)
        allowed = ((words.unsqueeze(-1) >> self._bits[device]) & 1).flatten().bool()
        width = scores.shape[-1]
        if allowed.numel() < width:
            allowed = torch.nn.functional.pad(allowed, (0, width - allowed.numel()))
        return scores.masked_fill(~allowed[:width], float("-inf"))

    @property
    def complete(self) -> bool:
        """Whether the answer so far is a whole valid value (the grammar accepts it)."""
        return self.matcher.is_accepting()


class Watch(StoppingCriteria):
    """Reports the tokens written every `every` steps and stops generation by raising when `check`
    raises (a cancel, a timeout); it never stops generation itself."""

    def __init__(
        self, prompt_length: int, report: Callable[[int], None], check: Callable[[], None], every: int = 8
    ):
        self.prompt_length = prompt_length
        self.report = report
        self.check = check
        self.every = every

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        written = input_ids.shape[1] - self.prompt_length
        if written % self.every == 0:
            self.report(written)
            self.check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
