"""IHASDataModule: whole batches, sharding over ranks x workers, seeded shuffles, row filters, errors.

The test data has a ``rid`` field holding ``file row index + 1``, so every yielded row is identifiable,
and ``label = (row % 3 == 0)``, so a batch whose labels do not travel with their rows is caught."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ihas_lightning.data import batches as dmod
from ihas_lightning.data.datamodule import IHASDataModule
from ihas_lightning.data.feature_map import LABEL, FeatureMap, Field
from ihas_lightning.data.sharding import rank_plan
from ihas_lightning.errors import ConfigError, DataError

ROWS = {"train": 1001, "val": 303, "test": 257}
RG = 97  # row group size (odd on purpose: ranks/workers cut through row groups)
MODES = ("in_memory", "streaming")

pytestmark = pytest.mark.filterwarnings("ignore:.*__len__.*")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    d = tmp_path_factory.mktemp("prepared")
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in ROWS.items():
        r = np.arange(n)
        cols = {
            "rid": pa.array((r + 1).astype(np.int32)),
            "a": pa.array(rng.integers(0, 10, n, dtype=np.int32)),
            "b": pa.array(rng.integers(0, 50, n, dtype=np.int32)),
            LABEL: pa.array((r % 3 == 0).astype(np.int8)),
            "_group": pa.array((r % 2).astype(np.int8)),
        }
        pq.write_table(pa.table(cols), d / f"{split}.parquet", row_group_size=RG)
        splits[split] = {"rows": n, "pos_rate": 0.33, "file": f"{split}.parquet"}
    vocab = max(ROWS.values()) + 1
    FeatureMap(
        dataset="test",
        fields=[Field("rid", vocab), Field("a", 10), Field("b", 50)],
        splits=splits,
        row_group_size=RG,
    ).save(d)
    return d


def rows_of(batches) -> np.ndarray:
    """File row indices of a list of batches, checking dtypes, shapes and label alignment."""
    out = []
    for x, y in batches:
        assert x.dtype == torch.int32 and y.dtype == torch.float32
        # (a DDP rank's slice of a global batch with fewer rows than ranks is empty)
        assert x.ndim == 2 and x.shape[1] == 3 and y.shape == (x.shape[0],)
        r = x[:, 0].long() - 1
        assert torch.equal(y, (r % 3 == 0).float())
        out.append(r.numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


@pytest.mark.parametrize(
    "n,world,bs", [(n, w, b) for n in (1, 5, 17, 64, 65, 130) for w in (1, 2, 3, 4) for b in (1, 2, 7, 64)]
)
def test_rank_plan_equal_counts_every_row_once(n, world, bs):
    try:
        plans = [rank_plan(n, world, r, bs) for r in range(world)]
    except ConfigError:
        assert n < world or bs == 1  # the only impossible cases
        return
    assert len({len(s) for _, s in plans}) == 1  # equal batch counts
    covered = np.concatenate([np.arange(st, st + s.sum()) for st, s in plans])
    assert np.array_equal(covered, np.arange(n))
    assert all(((s >= 1) & (s <= bs)).all() for _, s in plans)
    dl = [rank_plan(n, world, r, bs, drop_last=True)[1] for r in range(world)]
    assert len({len(s) for s in dl}) == 1 and all((s == bs).all() for s in dl)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("split", ["train", "val"])
def test_every_row_once_over_ranks_and_workers(prepared, mode, split):
    """2 ranks x 2 workers; workers simulated through get_worker_info (the dataset's own __iter__)."""
    bs = 64
    seen, counts = [], []
    for rank in range(2):
        dm = IHASDataModule(prepared, batch_size=bs, eval_batch_size=bs, mode=mode, rank=rank, world_size=2)
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        ds = loader.dataset
        n_rank = 0
        for w in range(2):
            orig = dmod.get_worker_info
            dmod.get_worker_info = lambda w=w: SimpleNamespace(id=w, num_workers=2)
            try:
                batches = list(iter(ds))
            finally:
                dmod.get_worker_info = orig
            assert all(len(y) <= bs for _, y in batches)
            seen.append(rows_of(batches))
            n_rank += len(batches)
        counts.append(n_rank)
        assert n_rank == len(ds) == len(loader)
    assert counts[0] == counts[1]
    allrows = np.concatenate(seen)
    assert np.array_equal(np.sort(allrows), np.arange(ROWS[split]))


@pytest.mark.parametrize("mode", MODES)
def test_real_worker_processes(prepared, mode):
    dm = IHASDataModule(prepared, batch_size=50, mode=mode, num_workers=2)
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader)
    assert np.array_equal(np.sort(rows_of(batches)), np.arange(ROWS["train"]))


@pytest.mark.parametrize("mode", MODES)
def test_train_shuffle_is_seeded_per_epoch(prepared, mode):
    def order(seed: int, epoch: int) -> np.ndarray:
        dm = IHASDataModule(prepared, batch_size=64, mode=mode, seed=seed, shuffle_buffer_batches=2)
        dm.set_epoch(epoch)
        return rows_of(list(dm.train_dataloader()))

    e0 = order(0, 0)
    assert np.array_equal(e0, order(0, 0))
    assert not np.array_equal(e0, order(0, 1))
    assert not np.array_equal(e0, order(1, 0))
    assert not np.array_equal(e0, np.arange(ROWS["train"]))
    assert np.array_equal(np.sort(e0), np.arange(ROWS["train"]))


def test_standalone_epochs_advance_and_trainer_epoch_is_used(prepared):
    dm = IHASDataModule(prepared, batch_size=64, mode="in_memory")
    loader = dm.train_dataloader()
    first, second = rows_of(list(loader)), rows_of(list(loader))
    assert not np.array_equal(first, second)
    ref = IHASDataModule(prepared, batch_size=64, mode="in_memory")
    ref.set_epoch(3)
    want = rows_of(list(ref.train_dataloader()))
    dm.trainer = SimpleNamespace(current_epoch=3, global_rank=0, world_size=1)
    assert np.array_equal(rows_of(list(dm.train_dataloader())), want)


def test_batches_whole_and_typed(prepared):
    dm = IHASDataModule(prepared, batch_size=128, mode="in_memory")
    assert dm.eval_batch_size == 512 and dm.search_batch_size == 128
    x, y = next(iter(dm.train_dataloader()))
    assert isinstance(dm.train_dataloader().dataset, torch.utils.data.IterableDataset)
    assert x.shape == (128, 3) and x.is_contiguous() and y.shape == (128,)
    assert dm.feature_map.field_names == ["rid", "a", "b"]
    assert dm.mode == "in_memory"


@pytest.mark.parametrize("mode", MODES)
def test_split_dataloader_is_file_order(prepared, mode):
    dm = IHASDataModule(prepared, batch_size=64, eval_batch_size=100, mode=mode, rank=1, world_size=2)
    for split, n in ROWS.items():
        batches = list(dm.split_dataloader(split))
        assert [len(y) for _, y in batches[:-1]] == [100] * (len(batches) - 1)
        assert np.array_equal(rows_of(batches), np.arange(n))  # whole split, not this rank's shard
    x, y = dm.split_arrays("test")
    assert x.dtype == torch.int32 and x.shape == (ROWS["test"], 3)
    assert np.array_equal(x[:, 0].numpy() - 1, np.arange(ROWS["test"]))
    shuffled = rows_of(list(dm.split_dataloader("val", shuffle=True)))
    assert not np.array_equal(shuffled, np.arange(ROWS["val"]))
    assert np.array_equal(np.sort(shuffled), np.arange(ROWS["val"]))


@pytest.mark.parametrize("mode", MODES)
def test_row_filter_keeps_exactly_the_selected_rows(prepared, mode):
    rng = np.random.default_rng(5)
    mask = rng.random(ROWS["train"]) < 0.3
    idx = np.array([300, 2, 7, 7, 150, 151, 152])
    flt = {"train": mask, "val": idx}
    want_train, want_val = np.flatnonzero(mask), np.unique(idx)
    for world, workers in ((1, 1), (2, 2)):
        got = []
        counts = []
        for rank, w in itertools.product(range(world), range(workers)):
            dm = IHASDataModule(
                prepared, batch_size=16, mode=mode, row_filter=flt, rank=rank, world_size=world
            )
            ds = dm.train_dataloader().dataset
            batches = list(ds.iter_shard(0, w, workers))
            got.append(rows_of(batches))
            counts.append(len(batches))
        assert np.array_equal(np.sort(np.concatenate(got)), want_train)
        per_rank = np.array(counts).reshape(world, workers).sum(1)
        assert (per_rank == per_rank[0]).all()
    dm = IHASDataModule(prepared, batch_size=16, mode=mode, row_filter=flt)
    assert dm.num_rows("train") == len(want_train) and dm.num_rows("test") == ROWS["test"]
    assert np.array_equal(rows_of(list(dm.split_dataloader("train"))), want_train)
    assert np.array_equal(rows_of(list(dm.split_dataloader("val", batch_size=3))), want_val)
    assert np.array_equal(dm.split_arrays("val")[0][:, 0].numpy() - 1, want_val)
    assert np.array_equal(dm.extra_column("val", "_group"), want_val % 2)
    assert len(dm.extra_column("test", "_group")) == ROWS["test"]


@pytest.mark.parametrize("mode", MODES)
def test_search_dataloader_cycles_over_val(prepared, mode):
    dm = IHASDataModule(prepared, batch_size=64, search_batch_size=50, mode=mode)
    per_pass = -(-ROWS["val"] // 50)
    it = iter(dm.search_dataloader())
    passes = [[next(it) for _ in range(per_pass)] for _ in range(3)]
    orders = [rows_of(p) for p in passes]
    for o in orders:
        assert np.array_equal(np.sort(o), np.arange(ROWS["val"]))
    assert not np.array_equal(orders[0], orders[1])
    assert all(len(y) == 50 for _, y in passes[0][:-1])


def test_auto_mode_and_drop_last(prepared):
    assert IHASDataModule(prepared).mode == "in_memory"
    assert IHASDataModule(prepared, memory_budget_gb=1e-6).mode == "streaming"
    for mode in MODES:
        dm = IHASDataModule(prepared, batch_size=64, mode=mode, drop_last=True, rank=0, world_size=2)
        sizes = [len(y) for _, y in dm.train_dataloader()]
        assert sizes == [32] * (ROWS["train"] // 64)  # batch_size is the global batch: half of it per rank


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_train_on_the_one_process_batches(prepared, mode, world):
    """trainer=ddp: batch_size is the global batch; the ranks' slices of each training batch (and of
    each gate batch of the search stream) put together are exactly the one-process batch."""

    def batches(rank: int, w: int, loader: str, epoch: int = 1):
        dm = IHASDataModule(prepared, batch_size=64, mode=mode, rank=rank, world_size=w, seed=3,
                            shuffle_buffer_batches=2)  # fmt: skip
        dm.set_epoch(epoch)
        if loader == "train":
            return list(dm.train_dataloader())
        it = iter(dm.search_dataloader("val"))
        return [next(it) for _ in range(7)]  # more than one pass over val (250 rows / 64)

    for loader in ("train", "search"):
        one = batches(0, 1, loader)
        ranks = [batches(r, world, loader) for r in range(world)]
        assert all(len(b) == len(one) for b in ranks)  # every rank steps as often as one process
        for i, (x1, y1) in enumerate(one):
            x = torch.cat([ranks[r][i][0] for r in range(world)])
            y = torch.cat([ranks[r][i][1] for r in range(world)])
            assert torch.equal(x, x1) and torch.equal(y, y1)
            assert (
                max(len(ranks[r][i][1]) for r in range(world))
                - min(len(ranks[r][i][1]) for r in range(world))
                <= 1
            )


def test_errors(prepared, tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset"):
        IHASDataModule(tmp_path).setup()
    with pytest.raises(DataError, match="does not exist"):
        IHASDataModule(tmp_path / "nope").setup()
    with pytest.raises(DataError, match="not a prepared dataset"):
        _ = IHASDataModule(tmp_path).feature_map
    # a prepared dir missing a split, and one missing a field column
    broken = tmp_path / "broken"
    broken.mkdir()
    FeatureMap.load(prepared).save(broken)
    for s in ("train", "val"):
        (broken / f"{s}.parquet").write_bytes((prepared / f"{s}.parquet").read_bytes())
    with pytest.raises(DataError, match="test.parquet: missing split file"):
        IHASDataModule(broken).setup()
    pq.write_table(pq.read_table(prepared / "test.parquet").drop_columns(["b"]), broken / "test.parquet")
    with pytest.raises(DataError, match="missing column"):
        IHASDataModule(broken).setup()
    with pytest.raises(DataError, match="row_filter\\['train'\\]"):
        IHASDataModule(prepared, row_filter={"train": np.ones(3, bool)}).setup()
    with pytest.raises(DataError, match="row_filter\\['val'\\]"):
        IHASDataModule(prepared, row_filter={"val": np.array([ROWS["val"]])}).setup()
    with pytest.raises(ConfigError):
        IHASDataModule(prepared, mode="fast")
    with pytest.raises(DataError, match="no column"):
        IHASDataModule(prepared).extra_column("val", "_p")


def test_bench_loader_smoke(tmp_path):
    from experiments.bench.bench_loader import bench_loader

    res = bench_loader(rows=3000, fields=5, batch_size=256, epochs=1)
    assert set(res["results"]) == {"in_memory", "streaming_w0", "streaming_w2"}
    for r in res["results"].values():
        assert r["rows"] == 3000 and r["batches"] == 12 and r["rows_per_s"] > 0


@pytest.mark.parametrize("bs,buf", [(2, 0), (13, 1), (50, 8), (97, 3), (200, 2), (2000, 8)])
def test_streaming_shuffle_buffer_sizes(prepared, bs, buf):
    for world, workers in ((1, 1), (3, 2)):
        got, counts = [], []
        for rank in range(world):
            dm = IHASDataModule(
                prepared,
                batch_size=bs,
                mode="streaming",
                shuffle_buffer_batches=buf,
                rank=rank,
                world_size=world,
            )
            ds = dm.train_dataloader().dataset
            batches = [b for w in range(workers) for b in ds.iter_shard(1, w, workers)]
            counts.append(len(batches))
            got.append(rows_of(batches))
        assert len(set(counts)) == 1
        assert np.array_equal(np.sort(np.concatenate(got)), np.arange(ROWS["train"]))


def test_streaming_shuffles_within_row_groups(prepared):
    dm = IHASDataModule(prepared, batch_size=32, mode="streaming", shuffle_buffer_batches=2)
    order = rows_of(list(dm.train_dataloader()))
    # row groups are permuted AND rows mixed: few neighbours are still file-order neighbours
    assert np.mean(np.diff(order) == 1) < 0.2


@pytest.mark.parametrize("world", [1, 2])
def test_device_resident_batches_equal_the_host_path(prepared, world):
    """dataset.device_resident: the split lives on the device and batches are torch gathers there (on
    the CPU here: the same code path); the batches, their order and the sharding are the host path's."""
    for rank in range(world):
        for epoch in (0, 1):
            got, want = [], []
            for resident, out in ((True, got), (False, want)):
                dm = IHASDataModule(prepared, batch_size=64, mode="in_memory", rank=rank, world_size=world,
                                    device_resident=resident, device="cpu", num_workers=2 if resident else 0)  # fmt: skip
                dm.set_epoch(epoch)
                loader = dm.train_dataloader()
                assert loader.num_workers == 0  # device slices take no workers even when asked
                assert loader.dataset.device_resident is resident
                out.extend(list(loader))
                out.extend(list(dm.val_dataloader()))
            assert len(got) == len(want)
            for (gx, gy), (wx, wy) in zip(got, want):
                assert torch.equal(gx, wx) and torch.equal(gy, wy)


def test_device_resident_is_the_default_on_a_gpu_trainer(tmp_path):
    from ihas_lightning.config import compose
    from ihas_lightning.rundir import device_resident

    assert not device_resident(compose([], output_dir=tmp_path))
    assert device_resident(compose(["trainer=gpu"], output_dir=tmp_path))
    assert not device_resident(
        compose(["trainer=gpu", "+dataset.device_resident=false"], output_dir=tmp_path)
    )
    assert device_resident(compose(["+dataset.device_resident=true"], output_dir=tmp_path))


def test_loader_knobs_from_the_dataset_config(tmp_path):
    from ihas_lightning.config import compose
    from ihas_lightning.data.dataset_dir import validate_config
    from ihas_lightning.rundir import loader_kwargs

    kw = loader_kwargs(
        compose(["+dataset.loader_mode=streaming", "+dataset.memory_budget_gb=0.5"], output_dir=tmp_path)
    )
    assert kw == {"mode": "streaming", "memory_budget_gb": 0.5, "device_resident": False}
    assert loader_kwargs(compose([], output_dir=tmp_path))["mode"] == "auto"
    for bad, key in (("+dataset.loader_mode=fast", "dataset.loader_mode"), ("+dataset.memory_budget_gb=-1", "dataset.memory_budget_gb"),
                     ("+dataset.device_resident=maybe", "dataset.device_resident")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            validate_config(compose([bad], output_dir=tmp_path))
