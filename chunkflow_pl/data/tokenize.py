"""Tokenise text and chat records with a local Hugging Face tokenizer; mark what is supervised.

Chat supervision with ``train_on=assistant``: a token is supervised iff it belongs to an assistant
turn's *content and end-of-turn marker*, not its role header. Two ways to find those tokens:

1. The template marks them itself with ``{% generation %}...{% endgeneration %}``: we use
   ``apply_chat_template(..., return_assistant_tokens_mask=True)``.
2. Otherwise (e.g. Qwen2.5's template), by rendering prefixes of the conversation. For assistant
   message ``k``::

       render(messages[:k], add_generation_prompt=True)   ...<|im_start|>assistant\\n
       render(messages[:k+1])                             ...<|im_start|>assistant\\nHi!<|im_end|>\\n
                                                                                   ^^^^^^^^^^^^^^^^ span k

   The character span between the two ends is the assistant's output; the full conversation is
   tokenised once with offsets, and a token is supervised iff it overlaps a span (the same rule
   ``transformers`` uses for generation blocks). Both renders must be prefixes of the full render;
   a template that rewrites earlier turns (e.g. strips reasoning) fails loudly instead of
   mislabelling.

Text records get the tokenizer's EOS appended (when it has one), so a model learns to stop.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from typing import Any

from chunkflow_pl.data.sources import DataError

_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")


def tokenizer_fingerprint(directory: str) -> str:
    """Hash of every regular file in the tokenizer directory (a changed vocab or template -> new cache)."""
    _require_dir(directory)
    h = hashlib.sha256()
    names = sorted(n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n)))
    for name in names:
        h.update(name.encode())
        with open(os.path.join(directory, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def load_tokenizer(directory: str) -> Any:
    """``AutoTokenizer`` from a local directory only; never touches the network."""
    _require_dir(directory)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # transformers raises OSError/ValueError/... for unusable dirs
        raise DataError(f"data.tokenizer={directory!r}: cannot load a tokenizer from it ({e})") from e


def _require_dir(directory: str) -> None:
    if not os.path.isdir(directory):
        raise DataError(
            f"data.tokenizer={directory!r} is not a directory; point it at a local Hugging Face tokenizer "
            f"(the model checkpoint dir with tokenizer.json / tokenizer_config.json)"
        )


def encode_text(tok: Any, text: str) -> list[int]:
    ids = list(tok(text)["input_ids"])
    eos = tok.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def has_generation_blocks(tok: Any) -> bool:
    template = tok.chat_template
    return isinstance(template, str) and bool(_GENERATION_RE.search(template))


def encode_chat(tok: Any, messages: Sequence[dict[str, str]], train_on: str) -> tuple[list[int], list[int] | None]:
    """(input_ids, labels) of one conversation; labels None means everything is supervised.

    Raises ``ValueError`` when the tokenizer has no chat template or the template is not
    prefix-stable; the caller adds file/line.
    """
    if not tok.chat_template:
        raise ValueError(
            "the tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
            "chat_template.jinja); add one or use data.kind=text"
        )
    msgs = [dict(m) for m in messages]
    if train_on == "all":
        text = tok.apply_chat_template(msgs, tokenize=False)
        return list(tok(text, add_special_tokens=False)["input_ids"]), None
    if has_generation_blocks(tok):
        out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(out["input_ids"])
        mask = list(out["assistant_masks"])
    else:
        text, spans = assistant_char_spans(tok, msgs)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = _mask_from_spans(enc["offset_mapping"], spans)
    labels = [t if m else -100 for t, m in zip(ids, mask, strict=True)]
    return ids, labels


def assistant_char_spans(tok: Any, msgs: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span ``[start, end)`` of every assistant output."""
    full = tok.apply_chat_template(msgs, tokenize=False)
    spans: list[tuple[int, int]] = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        upto = tok.apply_chat_template(msgs[: k + 1], tokenize=False)
        _require_prefix(upto, full, k, "the conversation up to it")
        end = len(upto)
        if k > 0:
            head = tok.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True)
            _require_prefix(head, full, k, "the turns before it plus the generation prompt")
            start = len(head)
        else:
            # nothing precedes it to render a generation prompt after: the output starts at its content
            start = full.rfind(m["content"], 0, end) if m["content"] else end
        if not 0 <= start <= end:
            raise ValueError(f"cannot locate assistant message {k} in the rendered conversation")
        spans.append((start, end))
    return full, spans


def _require_prefix(part: str, full: str, k: int, what: str) -> None:
    if not full.startswith(part):
        raise ValueError(
            f"the chat template is not prefix-stable at assistant message {k} (rendering {what} is not a "
            f"prefix of the whole conversation), so assistant tokens cannot be located; use a template "
            f"with {{% generation %}} blocks, or data.train_on=all"
        )


def _mask_from_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    mask = [0] * len(offsets)
    si = 0
    for t, (s, e) in enumerate(offsets):
        while si < len(spans) and s >= spans[si][1]:  # spans and offsets are both increasing
            si += 1
        if si == len(spans):
            break
        a, b = spans[si]
        # overlap; a zero-width token counts when it sits inside the span
        if (e > a and s < b) or (s == e and a <= s < b):
            mask[t] = 1
    return mask
