"""trainer.threads: auto = usable cores (affinity, cgroup quota) / parallel multirun jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ihas_lightning import threads
from ihas_lightning.errors import ConfigError


def test_cgroup_quota_v2_and_v1(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_quota(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_quota(tmp_path) == 2.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_quota(tmp_path) is None


def test_usable_cores_are_the_affinity_capped_by_the_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert threads.usable_cores(tmp_path) == 8  # no quota file
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert threads.usable_cores(tmp_path) == 3  # 2.5 CPUs -> 3 threads


@pytest.mark.parametrize("value, cores, jobs, want", [("auto", 8, 1, 8), ("auto", 8, 2, 4), ("auto", 2, 4, 1),
                                                       (3, 8, 2, 3), (None, 2, 1, 2)])  # fmt: skip
def test_choose(value, cores, jobs, want):
    assert threads.choose(value, cores=cores, jobs=jobs)[0] == want


def test_bad_values_are_one_line_errors():
    for bad in (0, -1, "many", 1.5, True):
        with pytest.raises(ConfigError, match="trainer.threads"):
            threads.check(bad)


def test_a_parallel_local_multirun_divides_the_cores(tmp_path):
    """Under hydra/launcher=local (2 jobs) on this machine each job logs cores // 2 threads."""
    import os
    import subprocess
    import sys

    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the launch extra (make install)")
    r = subprocess.run(
        [sys.executable, "-m", "ihas_lightning", "-m", "hydra/launcher=local", "stage=prepare", "dataset.rows=2000",
         "seed=0,1", f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}"],
        capture_output=True, text=True, env=dict(os.environ, WANDB_MODE="offline"),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    want = max(1, threads.usable_cores() // 2)
    logs = [p.read_text() for p in (tmp_path / "multiruns").glob("*/*/__main__.log")]
    assert len(logs) == 2 and all(
        f"torch threads: {want} (auto:" in t and "/ 2 parallel job(s)" in t for t in logs
    )


class _Machine:
    """A fake machine for the thread tuner: a fake clock (``time.perf_counter``), another process busy on
    ``busy_cores`` cores while ``busy`` is set, and the load those processes show (``load()``; ``None``:
    not known, so the tuner can only probe). ``step(threads, busy)`` gives a batch's seconds."""

    FORWARD = 0.25  # of a step's time: batch start to the first backward

    def __init__(self, monkeypatch, cores: int, step, known: bool = True, busy_cores: float = 1.0):
        from types import SimpleNamespace

        import torch

        self.t, self.busy, self.cores, self.step, self.known, self.busy_cores = (
            0.0,
            False,
            cores,
            step,
            known,
            busy_cores,
        )
        monkeypatch.setattr("time.perf_counter", lambda: self.t)
        self.trainer, self.batch = SimpleNamespace(global_step=0), (None, torch.zeros(10))

    def load(self):
        machine = self

        class Load:
            available, n = machine.known, machine.cores

            def reset(self) -> None:
                self.start = machine.t

            def busy(self) -> float | None:
                if not machine.known or machine.t - self.start < 0.2:
                    return None
                return machine.busy_cores if machine.busy else 0.05

        return Load()

    def fit(self, max_threads: int, n: int, busy: range) -> tuple[list[int], object]:
        """One fit of ``n`` batches (the other process busy during ``busy``): the thread count of each
        batch, and the tuner."""
        import torch

        from ihas_lightning import threads as th

        tuner = th.thread_tuner(max_threads, probe=3, first_check=5, max_every=40, warmup=2, load=self.load())
        tuner.on_train_start(self.trainer, None)
        seen = []
        for i in range(n):
            self.busy = i in busy
            tuner.on_train_batch_start(self.trainer, None, self.batch, i)
            seen.append(torch.get_num_threads())
            self.t += self.FORWARD * self.step(torch.get_num_threads(), self.busy)
            tuner.on_before_backward(self.trainer, None, None)
            # the backward and step: at the count set now (a probe may have ended in the forward)
            self.t += (1 - self.FORWARD) * self.step(torch.get_num_threads(), self.busy)
            tuner.on_train_batch_end(self.trainer, None, None, self.batch, i)
        tuner.on_train_end(self.trainer, None)
        assert torch.get_num_threads() == max_threads  # outside a fit: the configured count
        return seen, tuner


@pytest.fixture
def torch_threads(monkeypatch):
    """The test may change torch's thread count and the tuner's per-process state; both are restored."""
    import torch

    from ihas_lightning import threads as th

    before = torch.get_num_threads()
    monkeypatch.delitem(th._CHOSEN, "tuned", raising=False)  # a fresh process
    yield
    torch.set_num_threads(before)


def _two_cores(threads: int, busy: bool) -> float:  # 2 threads: 1.0 quiet, 10.0 with a busy core; 1: 1.5
    return 1.5 if threads == 1 else (10.0 if busy else 1.0)


def test_thread_tuner_follows_the_faster_count(monkeypatch, torch_threads):
    """auto while a fit runs: a fresh process starts at 1 thread and moves to 2 when it is faster; a busy
    core makes 2 threads slower than 1 -> the tuner switches to 1; when the core is free again it goes
    back to 2; the next fit starts where the last one ended. The load of other processes is not known
    here, so the tuner learns all of it by probing."""
    import torch

    torch.set_num_threads(2)
    m = _Machine(monkeypatch, 2, _two_cores, known=False)
    seen, _ = m.fit(2, 400, busy=range(100, 250))
    assert seen[0] == 1 and seen[12] == 2  # starts at 1, 2 threads measured faster within a few batches
    assert seen[90] == 2  # quiet: 2 threads kept
    assert seen[240] == 1  # busy core: switched to 1 thread
    assert seen[399] == 2  # free again: back to 2
    assert seen[150:250].count(2) <= 4  # probing 2 threads on the busy machine: one batch per check
    seen, _ = m.fit(2, 400, busy=range(400))  # the next fit starts at 2 (where the last ended); core busy
    assert seen[0] == 2 and seen[20] == 1
    assert sum(seen[20:]) - 380 <= 380 // 40 + 1  # from then on 1 thread; one probe batch at 2 per check
    seen, _ = m.fit(2, 60, busy=range(400))  # and the next one at 1, from the first batch
    assert all(n == 1 for n in seen[:6])  # until the first check probes 2
    t0 = m.t
    seen, _ = m.fit(2, 400, busy=range(400))  # starting at 1 on the busy machine: each probe of 2 ...
    wasted = m.t - t0 - 400 * 1.5
    probes = seen.count(2)
    assert 1 <= probes <= 400 // 40 + 2  # (4x further apart each time, at most 40 here)
    assert wasted == pytest.approx(probes * m.FORWARD * (10.0 - 1.5))  # ... costs its forward pass only


def test_the_tuner_does_not_probe_more_threads_while_other_processes_fill_the_cores(
    monkeypatch, torch_threads
):
    """With the load of other processes known (``OtherLoad``): while another process keeps the second core
    busy, a run at 1 thread never tries 2 (no probe to pay for); a run that starts at 2 still drops to 1
    by probing; once the core is free again the tuner probes 2 threads and takes them."""
    import torch

    from ihas_lightning import threads as th

    torch.set_num_threads(2)
    m = _Machine(monkeypatch, 2, _two_cores)
    th._CHOSEN["tuned"] = 1  # starts at 1 thread
    seen, tuner = m.fit(2, 320, busy=range(300))
    assert all(n == 1 for n in seen[:300])  # busy: 2 threads never tried
    assert tuner.skipped >= 300 // 40  # looked at the load every `every` batches (free: no back-off)
    assert tuner.probe_seconds == pytest.approx(3 * 1.0)  # one probe: 3 quiet batches, once freed
    assert seen[-1] == 2  # free again: probed within `every` batches and taken
    seen, _ = m.fit(2, 200, busy=range(200))  # starts at 2 (where the last fit ended), the core busy
    assert seen[0] == 2 and all(n == 1 for n in seen[20:])  # drops to 1 by probing, never goes back


def test_on_more_cores_the_tuner_tries_the_room_other_processes_leave(monkeypatch, torch_threads):
    """4 usable cores, another process on one of them: the tuner tries 3 threads (not 4, which would share
    the busy core) and keeps them; once the core is free it tries 4 and takes them."""
    import torch

    def step(threads: int, busy: bool) -> float:  # 4 threads with a busy core: every op waits for it
        return (10.0 if busy else 0.55) if threads == 4 else {1: 1.5, 2: 0.9, 3: 0.7}[threads]

    torch.set_num_threads(4)
    seen, _ = _Machine(monkeypatch, 4, step).fit(4, 400, busy=range(200))
    assert seen[0] == 1 and seen[10] == 3 and seen[199] == 3  # the room: 3 threads, kept
    assert seen[10:200].count(3) >= 185  # (a check against 1 thread now and then)
    assert 4 not in seen[:200]  # never onto the busy core
    assert seen[399] == 4  # freed: tried and taken


def test_other_load_reads_proc_stat(tmp_path):
    """The cores other processes used = the mask CPUs' non-idle ticks minus this process's CPU time."""
    stat = tmp_path / "stat"
    own = {"s": 10.0}

    def write(busy0: int, busy1: int, idle0: int, idle1: int, other: int = 0) -> None:
        stat.write_text(
            f"cpu  {busy0 + busy1} 0 0 {idle0 + idle1} 0 0 0 0 0 0\n"
            f"cpu0 {busy0} 0 0 {idle0} 0 0 0 0 0 0\ncpu1 {busy1 - busy1 // 2} 0 {busy1 // 2} {idle1} 0 0 0 0 0 0\n"
            f"cpu2 {other} 0 0 0 0 0 0 0 0 0\nintr 1 2 3\n"
        )

    write(0, 0, 0, 0)
    load = th_other_load(stat, own, tmp_path)
    assert load.available and load.n == 2
    write(5, 5, 5, 5)  # 0.1 s: too short to tell
    assert load.busy() is None
    own["s"] += 1.0  # this process: one core for 1 s; another process: the other core (cpu2 is not ours)
    write(100, 100, 0, 0, other=100)
    assert load.busy() == pytest.approx(1.0)
    load.reset()
    own["s"] += 1.0
    write(200, 100, 0, 100, other=200)  # the second core idle: only this process ran
    assert load.busy() == pytest.approx(0.0)
    assert threads.OtherLoad(stat, {0, 1}, quota_root=tmp_path / "none").available
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # a 1-CPU quota on a 2-CPU mask: not known
    assert not threads.OtherLoad(stat, {0, 1}, quota_root=tmp_path).available
    assert not threads.OtherLoad(tmp_path / "missing", {0, 1}, quota_root=tmp_path / "none").available


def th_other_load(stat, own, root):
    return threads.OtherLoad(stat, {0, 1}, own=lambda: own["s"], quota_root=root)


def test_our_training_step_does_not_depend_on_the_thread_count():
    """Our own ops (gated model, stochastic masks, row-wise Adam's merge) give bitwise-equal weights at 1
    and 2 threads on these shapes. PyTorch's vectorised elementwise kernels can still differ in the last
    bit at other shapes (a chunk's tail on the scalar path), which is why trainer.deterministic=true
    keeps one count for the whole run (next test)."""
    import torch
    import torch.nn.functional as F

    from ihas_lightning.models import DLRM
    from ihas_lightning.optim import RowwiseAdam

    def train(threads: int) -> torch.Tensor:
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        m = DLRM([100] * 6 + [5000] * 3, 16, gate={"tau": 0.1})
        emb = RowwiseAdam(m.embedding_parameters(), lr=1e-3)
        dense = torch.optim.Adam(m.dense_parameters() + m.arch_parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(1)
        for _ in range(10):
            x = torch.randint(0, 100, (1024, 9), generator=g)
            y = (torch.rand(1024, generator=g) < 0.3).float()
            emb.zero_grad()
            dense.zero_grad()
            F.binary_cross_entropy_with_logits(m(x, "stochastic"), y).backward()
            emb.step()
            dense.step()
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    before = torch.get_num_threads()
    try:
        assert torch.equal(train(1), train(2))
    finally:
        torch.set_num_threads(before)


def test_auto_keeps_one_thread_count_and_adaptive_is_opt_in(monkeypatch):
    """The default, auto, is the usable cores for the whole run (no tuner, the log says so); adaptive
    re-chooses while training, except under trainer.deterministic=true; an integer is never re-chosen."""
    import torch
    from omegaconf import OmegaConf

    from ihas_lightning.training import build_trainer

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        tuners = {}
        for name, over in {
            "default": {},
            "adaptive": {"threads": "adaptive"},
            "deterministic": {"threads": "adaptive", "deterministic": True},
            "fixed": {"threads": 2},
        }.items():
            cfg = OmegaConf.create(
                {"trainer": {"accelerator": "cpu", "devices": 1, "threads": "auto", **over}}
            )
            tr = build_trainer(cfg, 1, [], None, Path("."), enable_checkpointing=False)
            tuners[name] = [c for c in tr.callbacks if type(c).__name__ == "ThreadTuner"]
        assert len(tuners["adaptive"]) == 1
        assert not tuners["default"] and not tuners["deterministic"] and not tuners["fixed"]
    finally:
        torch.set_num_threads(before)
    assert "kept for the whole run" in threads.choose("auto", cores=2, jobs=1)[1]
    assert "kept for the whole run" in threads.choose("adaptive", cores=2, jobs=1, deterministic=True)[1]
    assert "re-chosen" in threads.choose("adaptive", cores=2, jobs=1)[1]
    assert threads.choose("adaptive", cores=8, jobs=2)[0] == threads.choose("auto", cores=8, jobs=2)[0] == 4


@pytest.mark.slow  # a benchmark script's own check (lab code): make test-all
def test_bench_train_load_runs_every_cell(tmp_path):
    """make bench-train's load part on tiny sizes: every setting quiet and with one core busy (the
    spinner is started and stopped by the benchmark); no speed is asserted."""
    import json
    import multiprocessing as mp

    from experiments.bench import bench_load

    bench_load.main(["--vocabs", "3000", "--batches", "10", "--loaded-batches", "8", "--rounds", "1",
                     "--textbook-batches", "4", "--warmup", "2", "--out", str(tmp_path)])  # fmt: skip
    r = json.loads((tmp_path / "bench_train_load.json").read_text())
    assert len(r["cells"]) == 2 and all(len(c) == 8 and min(c.values()) > 0 for c in r["cells"].values())
    assert all("skipped_probes" in r and key in r["skipped_probes"] for key in r["cells"])
    loaded = [k for k in r["ratios"] if k.endswith("one core busy")]
    assert loaded and "base/auto loaded / quiet" in r["ratios"][loaded[0]]
    assert "base/adaptive vs auto" in r["ratios"][loaded[0]]
    assert not [p for p in mp.active_children() if p.is_alive()]  # the spinner is gone


@pytest.mark.slow  # a benchmark script's own check (lab code): make test-all
def test_bench_train_alloc_runs_the_cli_pair(tmp_path):
    """make bench-train's malloc part on a tiny generated set: stage=search with malloc tuning on and
    off as subprocesses, their samples/s and page faults read back; no speed is asserted."""
    import json

    from experiments.bench import bench_alloc

    out = tmp_path / "alloc"
    bench_alloc.main(["--rows", "20000", "--rounds", "1", "--loads", "quiet", "--methods", "base",
                      "--out", str(out)])  # fmt: skip
    r = json.loads(out.with_suffix(".json").read_text())
    cell = r["cells"]["base/quiet"]
    assert set(cell["runs"]) == {"true", "false"}
    assert all(
        run["samples_per_s"] > 0 and run["minor_faults"] > 0 for v in cell["runs"].values() for run in v
    )
    assert len(cell["pair_ratios"]) == 1 and "tuned / untuned" in out.with_suffix(".md").read_text()


def test_bench_fuxictr_trains_fuxictrs_dnn(tmp_path):
    """The FuxiCTR side of make bench-fuxictr: its DNN over our fields learns on our batches."""
    pytest.importorskip("fuxictr", reason="FuxiCTR is installed only by make bench-fuxictr")
    from experiments.bench.bench_fuxictr import as_dicts, fuxictr_dnn
    from experiments.bench.bench_train import make_batches

    vocab = [50] * 5
    batches = as_dicts(make_batches(vocab, 30, 512), len(vocab))
    model = fuxictr_dnn(vocab, str(tmp_path))
    losses = [float(model.train_step(b).detach()) for b in batches]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_bench_fuxictr_e2e_runs_both_epochs(tmp_path):
    """make bench-fuxictr-e2e on a tiny generated set: our CLI epoch and FuxiCTR's npz epoch, both read
    back; no speed is asserted."""
    pytest.importorskip("fuxictr", reason="FuxiCTR is installed only by make bench-fuxictr(-e2e)")
    import json

    from experiments.bench import bench_fuxictr_e2e

    out = tmp_path / "e2e"
    bench_fuxictr_e2e.main(["--rows", "30000", "--rounds", "1", "--loads", "quiet", "--out", str(out)])
    r = json.loads(out.with_suffix(".json").read_text())
    cell = r["cells"]["quiet"]
    assert all(cell[s] > 0 for s in r["settings"]) and r["train_rows"] > 20000
    assert len(cell["ours (auto) / fuxictr (faster), per round"]) == 1
