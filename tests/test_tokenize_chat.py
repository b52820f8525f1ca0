"""Chat and text records through a real (tiny, locally trained) Hugging Face tokenizer.

The tokenizer is a WordLevel model with a whitespace pre-tokenizer, so tokenisation is
compositional: the tokens of a rendered conversation are the concatenation of the tokens of its
pieces. That lets the test compute the expected supervised tokens independently of the code under
test: for each assistant turn, its content tokens plus the end-of-turn token.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from chunkflow_pl.data import cache as cache_mod
from chunkflow_pl.data.cache import SourceSpec, load_cached_store
from chunkflow_pl.data.sources import DataError
from chunkflow_pl.data.tokenize import has_generation_blocks, load_tokenizer

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
PLAIN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# same rendering, but the template marks assistant output itself
GENERATION_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "system user assistant you are a helpful assistant",
    "hello there how are you today",
    "i am fine thank you and you",
    "what is the capital of france paris is the capital",
    "tell me a story once upon a time there was a cat",
]
CONVS = [
    [
        {"role": "system", "content": "you are a helpful assistant"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hello how are you"},
        {"role": "user", "content": "what is the capital of france"},
        {"role": "assistant", "content": "paris is the capital"},
    ],
    [
        {"role": "user", "content": "tell me a story about the assistant"},
        {"role": "assistant", "content": "once upon a time there was a cat"},
    ],
    [  # the assistant speaks first; an unknown word maps to <unk>
        {"role": "assistant", "content": "hello zebra"},
        {"role": "user", "content": "thank you"},
        {"role": "assistant", "content": "you are fine"},
    ],
]


def train_tokenizer(directory: Path, template: str) -> tuple[Path, Tokenizer]:
    """Train a WordLevel tokenizer in-process, wrap it as a transformers tokenizer, save it."""
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = template
    fast.save_pretrained(directory)
    return directory, raw


@pytest.fixture(scope="module")
def plain_tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok_plain"), PLAIN_TEMPLATE)


@pytest.fixture(scope="module")
def gen_tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("tok_gen"), GENERATION_TEMPLATE)


def expected(raw: Tokenizer, conv: list[dict], train_on: str) -> tuple[list[int], list[int] | None]:
    """Independent expectation: per message <|im_start|> role content <|im_end|>, concatenated."""

    def enc(text: str) -> list[int]:
        return raw.encode(text, add_special_tokens=False).ids

    start, end = raw.token_to_id("<|im_start|>"), raw.token_to_id("<|im_end|>")
    ids: list[int] = []
    labels: list[int] = []
    for m in conv:
        head = [start, *enc(m["role"])]
        body = [*enc(m["content"]), end]
        ids += head + body
        labels += [-100] * len(head) + (body if m["role"] == "assistant" else [-100] * len(body))
    return ids, (labels if train_on == "assistant" else None)


def write_jsonl(path: Path, recs: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


def chat_store(tmp_path, tok_dir, recs, train_on="assistant", on_bad="error", vocab=None, workers=0):
    f = tmp_path / "chat.jsonl"
    if recs is not None:  # None: reuse the file as it is (same mtime, so the same cache key)
        write_jsonl(f, recs)
    spec = SourceSpec("chat", (str(f),), str(tok_dir), train_on, vocab, on_bad)
    return load_cached_store(spec, tmp_path / "cache", workers=workers)


@pytest.mark.parametrize("which", ["plain", "generation"])
def test_assistant_only_supervision_is_exact(tmp_path, plain_tok, gen_tok, which):
    tok_dir, raw = plain_tok if which == "plain" else gen_tok
    assert has_generation_blocks(load_tokenizer(str(tok_dir))) == (which == "generation")
    store = chat_store(tmp_path, tok_dir, [{"messages": c} for c in CONVS])
    assert len(store) == len(CONVS)
    for i, conv in enumerate(CONVS):
        ids, labels = expected(raw, conv, "assistant")
        assert store.tokens(i).tolist() == ids
        assert store.labels(i).tolist() == labels


def test_train_on_all_supervises_everything(tmp_path, plain_tok):
    tok_dir, raw = plain_tok
    store = chat_store(tmp_path, tok_dir, [{"messages": c} for c in CONVS], train_on="all")
    for i, conv in enumerate(CONVS):
        assert store.tokens(i).tolist() == expected(raw, conv, "all")[0]
        assert store.labels(i) is None


def test_chat_parallel_workers_and_cache_hit(tmp_path, plain_tok, monkeypatch):
    tok_dir, _ = plain_tok
    recs = [{"messages": c} for c in CONVS] * 3
    pooled = chat_store(tmp_path, tok_dir, recs, workers=2)
    assert not pooled.cache_hit
    monkeypatch.setattr(cache_mod, "load_tokenizer", lambda *a: pytest.fail("tokenizer used on a cache hit"))
    again = chat_store(tmp_path, tok_dir, None, workers=2)
    assert again.cache_hit
    for i in range(len(recs)):
        assert again.tokens(i).tolist() == pooled.tokens(i).tolist()
        assert again.labels(i).tolist() == pooled.labels(i).tolist()


def test_changed_tokenizer_invalidates_cache(tmp_path, plain_tok, gen_tok):
    recs = [{"messages": CONVS[0]}]
    a = chat_store(tmp_path, plain_tok[0], recs)
    b = chat_store(tmp_path, gen_tok[0], None)
    assert a.entry != b.entry and not b.cache_hit


@pytest.mark.parametrize(
    "rec,fragments",
    [
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]},
            ["'messages[1].role'", "unknown role 'robot'"],
        ),
        ({"messages": [{"role": "user", "content": "hello"}]}, ["'messages'", "no supervised token"]),
        ({"messages": []}, ["'messages'", "empty"]),
        ({"messages": "hello"}, ["'messages'", "expected a list"]),
        ({"messages": [{"role": "user", "content": 5}]}, ["'messages[0].content'", "expected a string"]),
        ({"messages": [["user", "hi"]]}, ["'messages[0]'", "expected an object"]),
        ({"text": "hello"}, ["'messages'", "missing"]),
    ],
)
def test_bad_chat_records(tmp_path, plain_tok, rec, fragments):
    good = {"messages": CONVS[1]}
    with pytest.raises(DataError) as ei:
        chat_store(tmp_path, plain_tok[0], [good, good, rec])
    msg = str(ei.value)
    assert "chat.jsonl:3:" in msg and "data.on_bad_record=skip" in msg
    for frag in fragments:
        assert frag in msg, msg


def test_chat_tokens_outside_model_vocab(tmp_path, plain_tok):
    with pytest.raises(DataError, match=r"chat\.jsonl:1: field 'messages\[\d+\]'.*outside the model vocabulary"):
        chat_store(tmp_path, plain_tok[0], [{"messages": CONVS[0]}], vocab=3)


def test_chat_skip_mode(tmp_path, plain_tok):
    recs = [{"messages": CONVS[0]}, {"messages": [{"role": "bot", "content": "x"}]}, {"messages": CONVS[1]}]
    store = chat_store(tmp_path, plain_tok[0], recs, on_bad="skip")
    assert len(store) == 2 and store.skipped_records == 1


def test_template_that_rewrites_history_fails_loudly(tmp_path):
    # drops earlier assistant turns: prefixes are not stable, so spans cannot be located
    template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok_dir, _ = train_tokenizer(tmp_path / "tok", template)
    with pytest.raises(DataError, match=r"chat\.jsonl:1: field 'messages'.*not prefix-stable.*train_on=all"):
        chat_store(tmp_path, tok_dir, [{"messages": CONVS[0]}])


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(DataError, match="data.tokenizer"):
        chat_store(tmp_path, tmp_path / "nope", [{"messages": CONVS[0]}])


# ------------------------------------------------------------------------------------- text
def test_text_records_all_supervised_with_eos(tmp_path, plain_tok):
    tok_dir, raw = plain_tok
    texts = ["hello there how are you today", "paris is the capital of france"]
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts])
    store = load_cached_store(SourceSpec("text", (str(f),), str(tok_dir), "all", 100, "error"), tmp_path / "c", 0)
    eos = raw.token_to_id("<|endoftext|>")
    for i, t in enumerate(texts):
        assert store.tokens(i).tolist() == raw.encode(t, add_special_tokens=False).ids + [eos]
        assert store.labels(i) is None


@pytest.mark.parametrize(
    "rec,frag", [({"text": ""}, "'text' is empty"), ({"text": 3}, "'text' is a int"), ({"body": "x"}, "'text' missing")]
)
def test_bad_text_records(tmp_path, plain_tok, rec, frag):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello"}, rec])
    spec = SourceSpec("text", (str(f),), str(plain_tok[0]), "all", None, "error")
    with pytest.raises(DataError, match=rf"t\.jsonl:2: field {frag}"):
        load_cached_store(spec, tmp_path / "c", 0)
