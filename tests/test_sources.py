"""Record sources: pre-tokenised JSONL/Parquet, validation errors, skip mode, the on-disk cache,
synthetic data and DataConfig."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chunkflow_pl.data import cache as cache_mod
from chunkflow_pl.data.cache import SourceSpec, load_cached_store
from chunkflow_pl.data.config import DataConfig
from chunkflow_pl.data.sources import DataError, TokenStore
from chunkflow_pl.data.sources.synthetic import SyntheticStore, synthetic_lengths

VOCAB = 100
RECORDS = [
    {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
    {"input_ids": [5, 6, 7]},
    {"input_ids": [8, 9], "labels": [8, 9], "id": "extra fields are ignored"},
    {"input_ids": [10, 11, 12, 13, 14], "labels": [-100, 11, -100, 13, -100]},
]


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def spec(paths: list[Path], kind: str = "jsonl", on_bad: str = "error", vocab: int | None = VOCAB) -> SourceSpec:
    return SourceSpec(kind, tuple(str(p) for p in paths), None, "all", vocab, on_bad)


def load(paths: list[Path], tmp_path: Path, **kw) -> cache_mod.CachedStore:
    return load_cached_store(spec(paths, **kw), tmp_path / "cache", workers=0)


def contents(store: TokenStore) -> list[tuple[list[int], list[int] | None]]:
    out = []
    for i in range(len(store)):
        lab = store.labels(i)
        out.append((store.tokens(i).tolist(), None if lab is None else lab.tolist()))
    return out


# ------------------------------------------------------------------------------------- reading
def test_jsonl_pretokenized_with_labels(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [*RECORDS[:2], "", *RECORDS[2:]])  # a blank line is not a record
    store = load([f], tmp_path)
    assert isinstance(store, TokenStore)
    assert store.lengths.tolist() == [4, 3, 2, 5]
    assert store.tokens(0).tolist() == [1, 2, 3, 4]
    # labels stored for all records once any record has them; absent labels = the tokens themselves
    assert store.labels(0).tolist() == [-100, -100, 3, 4]
    assert store.labels(1).tolist() == [5, 6, 7]
    assert store.labels(3).tolist() == [-100, 11, -100, 13, -100]
    assert store.location(3).endswith("a.jsonl:5")  # 1-based line numbers, blank line counted
    assert store.skipped_records == 0


def test_jsonl_without_labels_stores_none(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])
    store = load([f], tmp_path)
    assert store.labels(0) is None and store.tokens(1).tolist() == [4, 5]


def test_parquet_equals_jsonl(tmp_path):
    j = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    p = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(RECORDS), p)
    assert contents(load([p], tmp_path)) == contents(load([j], tmp_path))


def test_multiple_files_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", RECORDS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", RECORDS[2:])
    both = load([a, b], tmp_path)
    assert contents(both) == contents(load([write_jsonl(tmp_path / "c.jsonl", RECORDS)], tmp_path))
    assert both.location(2).endswith("b.jsonl:1")


# ------------------------------------------------------------------------------------- bad input
BAD_CASES = [
    # (line 2 content, expected fragments of the message)
    ('{"input_ids": [1, 2,', [":2:", "malformed JSON"]),
    ('{"tokens": [1, 2]}', [":2:", "'input_ids'", "missing"]),
    ('{"input_ids": [1, 200, 3]}', [":2:", "'input_ids[1]'", "outside the model vocabulary"]),
    ('{"input_ids": [1, -5, 3]}', [":2:", "'input_ids[1]'", "outside"]),
    ('{"input_ids": [1, 2], "labels": [-100, -100]}', [":2:", "'labels'", "no supervised token"]),
    ('{"input_ids": [7]}', [":2:", "'input_ids'", "no supervised token"]),
    ('{"input_ids": "1 2 3"}', [":2:", "'input_ids'", "expected a list"]),
    ('{"input_ids": [1, "2"]}', [":2:", "'input_ids[1]'", "expected an integer"]),
    ('{"input_ids": [1, 2.5]}', [":2:", "'input_ids[1]'", "expected an integer"]),
    ('{"input_ids": [1, true]}', [":2:", "'input_ids[1]'", "expected an integer"]),
    ('{"input_ids": [1, 2], "labels": [1]}', [":2:", "'labels'", "must align"]),
    ('{"input_ids": [1, 2], "labels": [1, 300]}', [":2:", "'labels[1]'", "neither -100"]),
    ('{"input_ids": []}', [":2:", "'input_ids'", "empty"]),
    ("[1, 2, 3]", [":2:", "expected an object"]),
]


@pytest.mark.parametrize("line,fragments", BAD_CASES, ids=[c[0][:30] for c in BAD_CASES])
def test_bad_record_raises_with_location(tmp_path, line, fragments):
    f = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], line, RECORDS[1]])
    with pytest.raises(DataError) as ei:
        load([f], tmp_path)
    msg = str(ei.value)
    assert str(f) in msg
    for frag in fragments:
        assert frag in msg, msg
    assert "data.on_bad_record=skip" in msg
    assert isinstance(ei.value, ValueError)


def test_bad_parquet_row_names_row(tmp_path):
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"input_ids": [1, 2]}, {"input_ids": [1, 500]}]), p)
    with pytest.raises(DataError, match=r"bad\.parquet row 2: field 'input_ids\[1\]'"):
        load([p], tmp_path)


def test_empty_file_raises(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty.*data\.on_bad_record=skip"):
        load([f], tmp_path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load([tmp_path / "nope.jsonl"], tmp_path)


def test_no_cache_written_on_error(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], "{oops"])
    with pytest.raises(DataError):
        load([f], tmp_path)
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary entry was removed


def test_skip_mode_counts_and_warns(tmp_path, caplog):
    lines = [RECORDS[0], "{oops", '{"input_ids": [1, 999]}', RECORDS[1], '{"input_ids": [3]}', RECORDS[2]]
    f = write_jsonl(tmp_path / "mixed.jsonl", lines)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with caplog.at_level(logging.WARNING):
        store = load([f, empty], tmp_path, on_bad="skip")
    assert store.skipped_records == 3
    assert [t for t, _ in contents(store)] == [RECORDS[0]["input_ids"], RECORDS[1]["input_ids"], [8, 9]]
    assert [store.location(i).rsplit(":", 1)[1] for i in range(3)] == ["1", "4", "6"]
    text = caplog.text
    assert "skipped 3 bad records" in text and "mixed.jsonl:2" in text and "empty.jsonl" in text


def test_skip_mode_all_bad_still_errors(tmp_path):
    f = write_jsonl(tmp_path / "bad.jsonl", ["{oops", "[1]"])
    with pytest.raises(DataError, match="no usable records"):
        load([f], tmp_path, on_bad="skip")


# ------------------------------------------------------------------------------------- cache
def test_cache_hit_on_second_load(tmp_path, monkeypatch):
    f = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    first = load([f], tmp_path)
    assert not first.cache_hit
    entry = first.entry
    assert sorted(p.name for p in entry.iterdir()) == [
        "files.npy",
        "labels.npy",
        "lines.npy",
        "meta.json",
        "offsets.npy",
        "tokens.npy",
    ]
    assert np.load(entry / "tokens.npy", mmap_mode="r").dtype == np.int32

    def boom(*a, **k):
        raise AssertionError("the cache hit must not encode anything")

    monkeypatch.setattr(cache_mod, "RecordEncoder", boom)
    second = load([f], tmp_path)
    assert second.cache_hit and second.entry == entry
    assert contents(second) == contents(first)


def test_cache_key_tracks_inputs(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", RECORDS)
    k = cache_mod.cache_key(spec([f]))
    assert cache_mod.cache_key(spec([f], on_bad="skip")) != k
    assert cache_mod.cache_key(spec([f], vocab=50)) != k
    write_jsonl(f, RECORDS[:3])  # content (size, mtime) changed -> new key
    assert cache_mod.cache_key(spec([f])) != k


def test_store_pickles_without_data(tmp_path):
    import pickle

    store = load([write_jsonl(tmp_path / "a.jsonl", RECORDS)], tmp_path)
    store.tokens(0)
    clone = pickle.loads(pickle.dumps(store))
    assert clone._tokens is None and contents(clone) == contents(store)


def test_parallel_tokenisation_matches_inline(tmp_path):
    recs = [{"input_ids": [i % VOCAB, (i + 1) % VOCAB, (i * 7) % VOCAB]} for i in range(600)]
    f = write_jsonl(tmp_path / "many.jsonl", recs)
    inline = load_cached_store(spec([f]), tmp_path / "c1", workers=0)
    pooled = load_cached_store(spec([f]), tmp_path / "c2", workers=2)
    assert contents(pooled) == contents(inline)


# ------------------------------------------------------------------------------------- synthetic
def test_synthetic_lengths_long_tail():  # speed: benchmarks/data_speed.py
    lengths = synthetic_lengths(100_000, 256 * 1024, 2, seed=7)
    assert lengths.min() >= 2 and lengths.max() <= 256 * 1024
    assert (lengths < 4096).mean() > 0.99
    assert (lengths > 32 * 1024).sum() > 50  # the rare tail exists
    assert 100 < np.median(lengths) < 1000
    assert np.array_equal(lengths, synthetic_lengths(100_000, 256 * 1024, 2, seed=7))
    assert not np.array_equal(lengths, synthetic_lengths(100_000, 256 * 1024, 2, seed=8))


def test_synthetic_tokens_deterministic_and_learnable():
    a = SyntheticStore(50, 2048, 2, vocab_size=64, seed=3)
    b = SyntheticStore(50, 2048, 2, vocab_size=64, seed=3)
    i = int(np.argmax(a.lengths))
    ta = a.tokens(i)
    assert len(ta) == a.lengths[i] and ta.min() >= 0 and ta.max() < 64
    assert np.array_equal(ta, b.tokens(i))
    assert a.labels(i) is None
    # learnable: each token has at most 4 successors, so bigram entropy is far below ln(64)
    pairs = np.concatenate([np.stack([a.tokens(j)[:-1], a.tokens(j)[1:]], 1) for j in range(len(a))])
    succ_per_token = {int(x): len(set(pairs[pairs[:, 0] == x, 1].tolist())) for x in np.unique(pairs[:, 0])}
    assert max(succ_per_token.values()) <= 4


# ------------------------------------------------------------------------------------- config
def test_config_from_dict_and_sizes():
    cfg = DataConfig.from_dict({"kind": "synthetic", "max_len": "64k", "global_batch_size": 8})
    assert cfg.max_len == 64 * 1024 and cfg.global_batch_size == 8 and cfg.min_len == 2


def test_config_rejects_unknown_key():
    with pytest.raises(ValueError, match=r"unknown key data\.batch_size; accepted keys: .*global_batch_size"):
        DataConfig.from_dict({"batch_size": 4})


@pytest.mark.parametrize(
    "d,frag",
    [
        ({"kind": "csv"}, "data.kind"),
        ({"max_len": "lots"}, "data.max_len"),
        ({"kind": "jsonl"}, "data.path"),
        ({"kind": "jsonl", "path": "???"}, "data.path"),
        ({"kind": "jsonl", "path": "x.csv"}, "x.csv"),
        ({"kind": "chat", "path": "x.jsonl"}, "data.tokenizer"),
        ({"on_bad_record": "ignore"}, "data.on_bad_record"),
        ({"global_batch_size": 0}, "data.global_batch_size"),
    ],
)
def test_config_errors_name_the_key(d, frag):
    with pytest.raises(ValueError, match=frag.replace(".", r"\.")):
        DataConfig.from_dict(d)


def test_conf_yaml_files_load():
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "data"
    cfg = DataConfig.from_dict(OmegaConf.load(conf / "synthetic.yaml"))
    assert cfg.kind == "synthetic" and cfg.max_len == 8 * 1024
    for name in ("jsonl", "text", "chat"):
        raw = OmegaConf.load(conf / f"{name}.yaml")
        raw.path = "x.jsonl"
        if name != "jsonl":
            raw.tokenizer = "/tok"
        assert DataConfig.from_dict(raw).kind == name
    with pytest.raises(ValueError, match=r"data\.path"):
        DataConfig.from_dict(OmegaConf.load(conf / "jsonl.yaml"))


# ------------------------------------------------------------------------------------- bad bytes, lengths
def _file_with_bad_byte(tmp_path: Path, bad_line: int = 31, n: int = 40) -> Path:
    """~650-byte lines: the bad byte sits past the first 8 KiB a text-mode reader decodes ahead."""
    lines = [json.dumps({"input_ids": [i % VOCAB] * 100, "id": "x" * 300}).encode() for i in range(n)]
    lines[bad_line - 1] = lines[bad_line - 1].replace(b'"xx', b'"\xffx', 1)
    f = tmp_path / "bytes.jsonl"
    f.write_bytes(b"\n".join(lines) + b"\n")
    return f


def test_non_utf8_byte_is_reported_on_its_own_line(tmp_path):
    f = _file_with_bad_byte(tmp_path)
    column = f.read_bytes().split(b"\n")[30].index(b"\xff") + 1
    with pytest.raises(DataError, match=rf"bytes\.jsonl:31: not valid UTF-8 \(byte 0xff at byte {column} of the line"):
        load([f], tmp_path)


@pytest.mark.parametrize("workers", [0, 2])
def test_non_utf8_record_is_skipped_in_skip_mode(tmp_path, workers):
    store = load_cached_store(spec([_file_with_bad_byte(tmp_path)], on_bad="skip"), tmp_path / "c", workers=workers)
    assert store.skipped_records == 1 and len(store) == 39
    assert [int(store.location(i).rsplit(":", 1)[1]) for i in range(len(store))] == [*range(1, 31), *range(32, 41)]
    assert "bytes.jsonl:31: not valid UTF-8" in store.meta["first_errors"][0]


def test_record_longer_than_the_model_accepts(tmp_path):
    f = write_jsonl(tmp_path / "long.jsonl", [RECORDS[0], {"input_ids": [1] * 50}, RECORDS[1]])
    too_long = SourceSpec("jsonl", (str(f),), None, "all", VOCAB, "error", max_len=40)
    with pytest.raises(DataError, match=r"long\.jsonl:2: field 'input_ids' has 50 tokens, more than the model's "
                                        r"max_position_embeddings=40; .*model\.overrides\.max_position_embeddings"):
        load_cached_store(too_long, tmp_path / "c", workers=0)
    skipped = load_cached_store(SourceSpec("jsonl", (str(f),), None, "all", VOCAB, "skip", max_len=40),
                                tmp_path / "c", workers=0)
    assert skipped.lengths.tolist() == [4, 3] and skipped.skipped_records == 1
    fits = load_cached_store(SourceSpec("jsonl", (str(f),), None, "all", VOCAB, "error", max_len=50),
                             tmp_path / "c", workers=0)
    assert fits.lengths.tolist() == [4, 50, 3]  # a separate cache entry: the limit is part of the key
