"""ChunkFlowDataModule: global batches, dp sharding, label counting, exact mid-epoch resume."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from chunkflow_pl.data.config import DataConfig
from chunkflow_pl.data.datamodule import ChunkFlowDataModule
from chunkflow_pl.data.dataset import GlobalBatchSampler
from chunkflow_pl.data.types import IGNORE_INDEX, StepBatch

VOCAB = 97


def make_dm(dp_rank=0, dp_size=1, chunk_size=512, **data) -> ChunkFlowDataModule:
    cfg = DataConfig(**{"num_sequences": 70, "global_batch_size": 16, "max_len": "2k", "seed": 5, **data})
    dm = ChunkFlowDataModule(cfg, chunk_size=chunk_size, vocab_size=VOCAB, dp_rank=dp_rank, dp_size=dp_size)
    dm.setup("fit")
    return dm


def epoch_batches(dm: ChunkFlowDataModule, loader=None) -> list[StepBatch]:
    return list(loader if loader is not None else dm.train_dataloader())


def fingerprint(b: StepBatch) -> tuple:
    return (
        tuple(b.sample_ids),
        b.num_label_tokens,
        b.step_index,
        tuple(tuple(c.input_ids_T.tolist()) for c in b.chunks),
        tuple(tuple(c.labels_T.tolist()) for c in b.chunks),
    )


def test_worker_processes_build_identical_batches():
    assert [fingerprint(x) for x in epoch_batches(make_dm(num_workers=2))] == [
        fingerprint(x) for x in epoch_batches(make_dm())
    ]


def test_deterministic():
    a, b = epoch_batches(make_dm()), epoch_batches(make_dm())
    assert [fingerprint(x) for x in a] == [fingerprint(x) for x in b]
    c = epoch_batches(make_dm(seed=6))
    assert [x.sample_ids for x in a] != [x.sample_ids for x in c]


def test_epoch_covers_every_sequence_once_and_keeps_last_partial_batch():
    dm = make_dm()
    batches = epoch_batches(dm)
    assert len(batches) == dm.num_batches_per_epoch == 5  # ceil(70 / 16)
    assert [len(b.sample_ids) for b in batches] == [16, 16, 16, 16, 6]
    seen = Counter(i for b in batches for i in b.sample_ids)
    assert sorted(seen) == list(range(70)) and set(seen.values()) == {1}
    lengths = dm.store.lengths
    for b in batches:
        assert b.seq_lens == [int(lengths[i]) for i in b.sample_ids]
        assert b.num_chunks_global == len(b.chunks)  # dp = 1: this rank runs every chunk
        assert all(c.num_tokens <= 512 for c in b.chunks)


def test_shuffle_off_is_identity_and_epochs_differ_when_shuffled():
    ordered = epoch_batches(make_dm(shuffle=False))
    assert [i for b in ordered for i in b.sample_ids] == list(range(70))
    dm = make_dm()
    loader = dm.train_dataloader()
    e0 = [b.sample_ids for b in loader]
    e1 = [b.sample_ids for b in loader]  # a plain loop moves to the next epoch by itself
    assert e0 != e1 and sorted(sum(e0, [])) == sorted(sum(e1, []))
    loader.sampler.set_epoch(0)  # what Lightning does every epoch
    assert [b.sample_ids for b in loader] == e0


def _tokens_of(dm: ChunkFlowDataModule, b: StepBatch) -> dict[int, dict[int, tuple[int, int]]]:
    """seq -> {position: (token, label)} collected from the chunks of one rank."""
    out: dict[int, dict[int, tuple[int, int]]] = defaultdict(dict)
    for c in b.chunks:
        bounds = c.cu_seqlens_B1.tolist()
        for k, seg in enumerate(c.segments):
            ids = c.input_ids_T[bounds[k] : bounds[k + 1]].tolist()
            labs = c.labels_T[bounds[k] : bounds[k + 1]].tolist()
            pos = c.position_ids_T[bounds[k] : bounds[k + 1]].tolist()
            assert pos == list(range(seg.start, seg.end))
            for p, t, lab in zip(pos, ids, labs, strict=True):
                assert p not in out[seg.seq], "token placed twice"
                out[seg.seq][p] = (t, lab)
    return out


def test_dp2_shards_are_disjoint_and_cover_each_global_batch():
    full = epoch_batches(make_dm(chunk_size=256))
    r0 = epoch_batches(make_dm(0, 2, chunk_size=256))
    r1 = epoch_batches(make_dm(1, 2, chunk_size=256))
    store = make_dm().store
    assert len(r0) == len(r1) == len(full)
    for f, a, b in zip(full, r0, r1, strict=True):
        assert a.sample_ids == b.sample_ids == f.sample_ids
        assert a.num_label_tokens == b.num_label_tokens == f.num_label_tokens
        assert len(a.chunks) == len(b.chunks)  # padded to the same number of micro-steps
        assert a.num_chunks_global == b.num_chunks_global == f.num_chunks_global
        ta, tb = _tokens_of(None, a), _tokens_of(None, b)
        assert not set(ta) & set(tb), "a sequence must live on one rank (its chain passes state)"
        merged = {**ta, **tb}
        assert sorted(merged) == list(range(len(f.sample_ids)))
        for s, sid in enumerate(f.sample_ids):
            tokens = store.tokens(sid).tolist()
            assert [merged[s][p][0] for p in range(len(tokens))] == tokens
            # labels are the next token of the same sequence; the last one predicts nothing
            assert [merged[s][p][1] for p in range(len(tokens))] == tokens[1:] + [IGNORE_INDEX]
        # forward order within a rank: pieces of a sequence appear in increasing start order
        for batch in (a, b):
            starts: dict[int, int] = {}
            for c in batch.chunks:
                for seg in c.segments:
                    assert seg.start == starts.get(seg.seq, 0)
                    starts[seg.seq] = seg.end


def test_num_label_tokens_counts_whole_global_batch():
    for b in epoch_batches(make_dm(0, 2)):
        assert b.num_label_tokens == sum(n - 1 for n in b.seq_lens)  # synthetic: all supervised


def test_num_label_tokens_with_labels(tmp_path):
    recs = []
    rng = np.random.default_rng(0)
    for _ in range(23):
        n = int(rng.integers(2, 40))
        ids = rng.integers(0, VOCAB, n).tolist()
        labels = [t if rng.random() < 0.5 else -100 for t in ids]
        labels[-1] = ids[-1]  # at least one supervised target
        recs.append({"input_ids": ids, "labels": labels})
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    cfg = DataConfig(kind="jsonl", path=str(f), global_batch_size=8, cache_dir=str(tmp_path / "c"))
    for rank in (0, 1):
        dm = ChunkFlowDataModule(cfg, chunk_size=32, vocab_size=VOCAB, dp_rank=rank, dp_size=2)
        dm.prepare_data()
        dm.setup("fit")
        assert dm.cache_hit == (rank == 1)  # prepare_data built it once; setup only opened it
        for b in epoch_batches(dm):
            want = sum(sum(x != -100 for x in recs[i]["labels"][1:]) for i in b.sample_ids)
            assert b.num_label_tokens == want
            got = sum(int((c.labels_T != IGNORE_INDEX).sum()) for c in b.chunks)
            assert got <= want


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_mid_epoch_matches_uninterrupted_run(num_workers):
    reference = make_dm(num_workers=num_workers)
    loader = reference.train_dataloader()
    want = [b.sample_ids for b in loader] + [b.sample_ids for b in loader]  # two epochs

    first = make_dm(num_workers=num_workers)
    it = iter(first.train_dataloader())
    got = [next(it).sample_ids for _ in range(2)]  # 2 of 5 batches
    state = first.state_dict()
    assert state["epoch"] == 0 and state["loader"]
    del it, first

    resumed = make_dm(num_workers=num_workers)
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    got += [b.sample_ids for b in loader]  # the rest of epoch 0
    got += [b.sample_ids for b in loader]  # epoch 1
    assert got == want


def test_resume_in_second_epoch_and_at_epoch_end():
    ref = make_dm()
    loader = ref.train_dataloader()
    want = [b.sample_ids for _ in range(3) for b in loader]

    dm = make_dm()
    loader = dm.train_dataloader()
    got = [b.sample_ids for b in loader]
    end_state = dm.state_dict()  # taken at the end of epoch 0
    it = iter(loader)
    got += [next(it).sample_ids for _ in range(3)]
    mid_state = dm.state_dict()

    at_end = make_dm()
    at_end.load_state_dict(end_state)
    assert [b.sample_ids for b in at_end.train_dataloader()] == want[5:10]

    mid = make_dm()
    mid.load_state_dict(mid_state)
    loader = mid.train_dataloader()
    assert got + [b.sample_ids for b in loader] + [b.sample_ids for b in loader] == want


def test_loading_the_same_state_twice_does_not_skip_twice():
    dm = make_dm()
    it = iter(dm.train_dataloader())
    next(it)
    next(it)
    state = dm.state_dict()
    resumed = make_dm()
    resumed.load_state_dict(state)
    loader = resumed.train_dataloader()
    loader.load_state_dict(state["loader"])  # what Lightning's fit loop does as well
    assert [b.step_index for b in loader] == [2, 3, 4]


def test_resume_with_changed_batching_is_refused():
    dm = make_dm()
    it = iter(dm.train_dataloader())
    next(it)
    other = make_dm(global_batch_size=8)
    with pytest.raises(ValueError, match="global_batch_size"):
        other.load_state_dict(dm.state_dict())


def test_sampler_is_not_replaced_by_lightning():
    # Lightning injects a DistributedSampler only when the loader's sampler is not one already
    from torch.utils.data.distributed import DistributedSampler

    loader = make_dm().train_dataloader()
    assert isinstance(loader.sampler, GlobalBatchSampler) and isinstance(loader.sampler, DistributedSampler)
    assert len(loader) == 5


def test_dp_rank_comes_from_the_layout_owner_once_processes_exist():
    """The rank is asked for in setup() (the strategy knows it only then), never guessed from the trainer."""
    owner = {"rank": None}
    cfg = DataConfig(num_sequences=30)
    dm = ChunkFlowDataModule(cfg, chunk_size=512, vocab_size=VOCAB, dp_rank=lambda: owner["rank"], dp_size=3)
    owner["rank"] = 1
    dm.setup("fit")
    assert (dm.dp_rank, dm.dp_size) == (1, 3)
    assert dm.dataset.spec.dp_rank == 1
    with pytest.raises(ValueError, match=r"rank 3 is outside \[0, 3\)"):
        ChunkFlowDataModule(cfg, chunk_size=512, vocab_size=VOCAB, dp_rank=3, dp_size=3).setup("fit")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_fit_resume_sees_the_uninterrupted_batches(tmp_path):
    """End to end through Lightning's checkpointing: no batch repeated or skipped on resume."""
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[tuple[int, ...]] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(tuple(batch.sample_ids))
            return self.w * 0.0 + self.w**2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(max_steps: int, ckpt=None, callbacks=()) -> tuple[Recorder, pl.Trainer]:
        model = Recorder()
        trainer = pl.Trainer(
            max_steps=max_steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            callbacks=list(callbacks),
            enable_checkpointing=bool(callbacks),
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        cfg = DataConfig(num_sequences=70, global_batch_size=16, max_len="1k", seed=5)
        trainer.fit(model, datamodule=ChunkFlowDataModule(cfg, chunk_size=256, vocab_size=VOCAB), ckpt_path=ckpt)
        return model, trainer

    full, _ = fit(9)  # 5 batches per epoch: epoch 0 and 4 batches of epoch 1
    assert len(full.seen) == 9 and len(set(full.seen[:5])) == 5
    assert full.seen[5:9] != full.seen[0:4]  # Lightning's set_epoch gave epoch 1 a new permutation

    # (a) checkpoint written during training (ModelCheckpoint at step 3), then killed at step 4
    from lightning.pytorch.callbacks import ModelCheckpoint

    every3 = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    part, _ = fit(4, callbacks=[every3])
    rest, _ = fit(9, ckpt=str(tmp_path / "ck" / "epoch=0-step=3.ckpt"))
    assert part.seen[:3] + rest.seen == full.seen

    # (b) checkpoint written after fit returned (the loader's iterator was torn down by then)
    part, trainer = fit(7)  # stops inside epoch 1
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    rest, _ = fit(9, ckpt=str(tmp_path / "after.ckpt"))
    assert part.seen + rest.seen == full.seen
