"""facedis/data.py: shapes, neutral GT, partners, D pretraining pairs, workers, distributed sampler."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from facedis.prep import synth
from facedis.data import FaceDataset, PairDataset, collate_batch, load_info, make_train_loader


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "tiny"
    opts = synth.default_options(subjects=6, per_subject=12, vertices=300, frames_per_sequence=4)
    synth.write(synth.generate(**opts), out, shard_size=16)  # several shards per split
    return out


def test_load_info(root):
    info = load_info(root)
    assert info.num_vertices == 300 and info.triangles.dtype == np.int32
    assert info.mean_face.shape == (300, 3) and info.template.shape == (300, 3)
    assert info.mm_per_unit == 260.0 and len(info.subjects) == 6 and len(info.expressions) == len(synth.EXPRESSIONS)
    assert info.neutral("train").shape == (6, 300, 3) and len(info.content_hash) == 64
    assert len(info.shard_paths("train")) > 1


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_item_and_batch_shapes(root, in_memory):
    ds = FaceDataset(root, "train", in_memory=in_memory)
    assert ds.in_memory == (in_memory == "yes")
    it = ds[3]
    assert it["vertices"].shape == it["neutral"].shape == it["partner"].shape == (300, 3)
    assert it["vertices"].dtype == it["neutral"].dtype == it["partner"].dtype == torch.float32
    for k, dt in (("subject", torch.int64), ("expression", torch.int64), ("index", torch.int64),
                  ("level", torch.float32), ("is_neutral", torch.bool)):
        assert it[k].dtype == dt and it[k].shape == ()
    b = collate_batch(ds.__getitems__([0, 5, 7, 5]))
    assert b["vertices"].shape == (4, 300, 3) and b["subject"].shape == (4,) and b["index"].tolist() == [0, 5, 7, 5]
    assert torch.equal(b["vertices"][1], ds[5]["vertices"])
    info = load_info(root)
    for i in range(len(b["index"])):
        assert torch.equal(b["neutral"][i], torch.from_numpy(info.neutral("train")[int(b["subject"][i])]))


def test_in_memory_and_lazy_agree(root):
    a = FaceDataset(root, "test", in_memory="yes", seed=3)
    b = FaceDataset(root, "test", in_memory="no", seed=3)
    idx = list(range(len(a)))
    ba, bb = a[idx], b[idx]
    for k in ba:
        assert torch.equal(ba[k], bb[k]), k


def test_partner_same_identity_and_reproducible(root):
    ds = FaceDataset(root, "train", seed=1)
    idx = np.arange(len(ds))
    b = ds[list(idx)]
    assert np.array_equal(b["subject"].numpy(), ds.subject)
    p = b["partner_index"].numpy()
    assert (ds.subject[p] == ds.subject[idx]).all()
    for i in range(0, len(ds), 7):
        assert torch.equal(b["partner"][i], ds[int(p[i])]["vertices"])
    # a function of (seed, epoch, index): batch composition and order do not matter
    again = FaceDataset(root, "train", seed=1)[list(idx[::-1])]["partner_index"].numpy()[::-1]
    assert np.array_equal(p, again)
    ds.set_epoch(1)
    p1 = ds[list(idx)]["partner_index"].numpy()
    assert not np.array_equal(p, p1) and (ds.subject[p1] == ds.subject[idx]).all()
    assert np.array_equal(p1, ds.partner_indices(idx, epoch=1)) and np.array_equal(p, ds.partner_indices(idx, epoch=0))
    # uniform over the subject's items, itself included
    many = np.concatenate([ds.partner_indices([0], epoch=e) for e in range(400)])
    own = np.flatnonzero(ds.subject == ds.subject[0])
    assert set(many) == set(own)


def test_pair_dataset_balanced(root):
    ds = PairDataset(root, "train", seed=0)
    idx = np.arange(len(ds))
    same_all = []
    for e in range(50):
        j, same = ds.pair_indices(idx, epoch=e)
        s = same.astype(bool)
        assert (ds.subject[j][s] == ds.subject[idx][s]).all()
        assert (ds.subject[j][~s] != ds.subject[idx][~s]).all()
        same_all.append(same)
    frac = np.concatenate(same_all).mean()
    n = len(idx) * 50
    assert abs(frac - 0.5) < 4 * 0.5 / np.sqrt(n), frac
    b = ds[[0, 1, 2]]
    assert b["a"].shape == b["b"].shape == (3, 300, 3) and b["same"].dtype == torch.int64
    j, same = ds.pair_indices([0, 1, 2])
    assert torch.equal(b["b"][2], ds.data.gather(np.array([j[2]]))[0])


def _collect(loader, key="index"):
    return torch.cat([b[key] for b in loader])


@pytest.mark.parametrize("in_memory", ["yes", "no"])
def test_multi_worker_loading_matches_single_process(root, in_memory):
    base = make_train_loader(root, "train", batch_size=8, shuffle=False, seed=5, num_workers=0,
                             drop_last=False, in_memory=in_memory)
    ref = {k: _collect(base, k) for k in ("index", "partner_index", "vertices")}
    loader = make_train_loader(root, "train", batch_size=8, shuffle=False, seed=5, num_workers=2,
                               drop_last=False, in_memory=in_memory)
    for k, v in ref.items():
        assert torch.equal(_collect(loader, k), v), k
    # set_epoch reaches the persistent workers
    loader.dataset.set_epoch(3)
    base.dataset.set_epoch(3)
    assert torch.equal(_collect(loader, "partner_index"), _collect(base, "partner_index"))


def test_spawn_worker(root):
    ds = FaceDataset(root, "test", in_memory="no", seed=2)
    dl = DataLoader(ds, batch_size=4, num_workers=1, collate_fn=collate_batch, multiprocessing_context="spawn")
    got = _collect(dl, "partner_index")
    assert torch.equal(got, torch.from_numpy(ds.partner_indices(np.arange(len(ds)))))


def test_shuffled_loader_and_default_collate(root):
    loader = make_train_loader(root, "train", batch_size=5, shuffle=True, seed=0, num_workers=0, drop_last=True)
    order1 = _collect(loader)
    b = next(iter(loader))
    assert b["vertices"].shape == (5, 300, 3) and b["partner"].shape == (5, 300, 3)
    order2 = _collect(make_train_loader(root, "train", batch_size=5, shuffle=True, seed=0, num_workers=0, drop_last=True))
    assert torch.equal(order1, order2) and len(order1) == len(loader.dataset) // 5 * 5
    # a plain DataLoader with the default collate_fn also works (per-item dicts built on demand)
    plain = next(iter(DataLoader(FaceDataset(root, "train"), batch_size=3)))
    assert plain["vertices"].shape == (3, 300, 3) and plain["subject"].dtype == torch.int64
    assert plain["index"].tolist() == [0, 1, 2]


def test_distributed_sampler(root):
    ds = FaceDataset(root, "train", seed=0)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(1)
        ds.set_epoch(1)
        dl = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate_batch)
        for b in dl:
            seen.append(b["index"])
            assert torch.equal(b["partner_index"], torch.from_numpy(ds.partner_indices(b["index"].numpy(), epoch=1)))
    seen = torch.cat(seen)
    assert sorted(seen.tolist()) == list(range(len(ds)))


def _batches(loader, keys, hold=0):
    """Clone each batch's ``keys``; with ``hold`` keep references to the last ``hold`` batches and
    check they are unchanged when the next arrives (the SlotLoader's validity contract)."""
    import time
    from collections import deque

    out, held = [], deque(maxlen=hold or 1)
    for b in loader:
        for ref, copy in (held if hold else []):
            for k in keys:
                assert torch.equal(ref[k], copy[k]), f"a held batch was overwritten ({k})"
        c = {k: b[k].clone() for k in keys}
        out.append(c)
        if hold:
            held.append((b, c))
            time.sleep(0.002)  # let the workers run ahead and fill every slot in flight
    return {k: torch.cat([c[k] for c in out]) for k in keys}


@pytest.mark.parametrize("in_memory,pair", [("yes", False), ("no", False), ("yes", True)])
def test_slot_loader_matches_in_process(root, in_memory, pair):
    from facedis.data import SlotLoader

    keys = ["a", "b", "same", "b_index"] if pair else ["vertices", "partner", "neutral", "partner_index", "level"]
    kw = dict(batch_size=8, shuffle=False, seed=5, drop_last=False, in_memory=in_memory, pair=pair)
    base = make_train_loader(root, "train", num_workers=0, **kw)
    loader = make_train_loader(root, "train", num_workers=2, reuse_buffers=True, **kw)
    assert isinstance(loader, SlotLoader) and len(loader) == len(base)
    for epoch in (0, 3):  # the last batch is smaller (drop_last=False); set_epoch reaches the workers
        base.dataset.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        ref, got = _batches(base, keys), _batches(loader, keys, hold=2)
        for k in keys:
            assert torch.equal(got[k], ref[k]), k


def test_slot_loader_spawn_and_sampler(root):
    """Spawned workers receive the shared slots; a sampler of index lists (the engine's way)."""
    from facedis.data import SlotLoader
    from facedis.distributed import GlobalBatchSampler

    ds = FaceDataset(root, "train", in_memory="yes", seed=1)
    sampler = GlobalBatchSampler(len(ds), 6, seed=3)
    loader = SlotLoader(ds, max_batch=6, num_workers=1, sampler=sampler, batch_size=None,
                        multiprocessing_context="spawn")
    got = _batches(loader, ["vertices", "index"], hold=2)
    idx = torch.cat([torch.as_tensor(b) for b in sampler])
    assert torch.equal(got["index"], idx)
    assert torch.equal(got["vertices"], ds.data.vertices[idx])
    with pytest.raises(ValueError, match="slots hold"):  # a batch larger than the slots is refused
        SlotLoader(ds, max_batch=2, num_workers=1, batch_size=4).__iter__().__next__()


def test_two_slot_loaders_over_one_dataset(root):
    """Each SlotLoader keeps its own slots, even after another one was built over the same dataset."""
    from facedis.data import SlotLoader

    ds = FaceDataset(root, "train", in_memory="yes", seed=1)
    a = SlotLoader(ds, max_batch=8, num_workers=2, batch_size=8)
    b = SlotLoader(ds, max_batch=4, num_workers=1, batch_size=4)
    for loader in (a, b, a):
        got = _batches(loader, ["vertices", "index"], hold=2)
        assert torch.equal(got["vertices"], ds.data.vertices[got["index"]])
        assert torch.equal(got["index"], torch.arange(len(ds)))  # every item once, in order (no shuffle)
