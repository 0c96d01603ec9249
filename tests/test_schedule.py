"""Data-size-aware budgets: auto batch size, auto gate schedule, the output-bias prior, and the
pretraining criterion of the search (SearchSchedule)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ihas_lightning import schedule
from ihas_lightning.errors import ConfigError

MODEL = OmegaConf.create({"batch_size": "auto", "max_batch_size": 2048, "min_batches_per_epoch": 32})
SEARCH = OmegaConf.create({"search_every": "auto", "max_search_every": 100, "gate_steps_per_epoch": 50})


@pytest.mark.parametrize(
    "rows, want",
    [(36_000_000, 2048), (7200, 128), (3000, 64), (65_536, 2048), (65_535, 1024), (500, 32), (10, 32)],
)
def test_auto_batch_size_keeps_the_paper_value_on_full_data_and_enough_steps_on_a_sample(rows, want):
    bs = schedule.batch_size(MODEL, rows)
    assert bs == want
    if rows >= 32 * 32:  # at least min_batches_per_epoch batches whenever the floor allows it
        assert math.ceil(rows / bs) >= 32


def test_explicit_batch_size_and_bad_values():
    assert schedule.batch_size(OmegaConf.create({**MODEL, "batch_size": 256}), 10) == 256
    for key, value in (("batch_size", 0), ("batch_size", "big"), ("max_batch_size", -1),
                       ("min_batches_per_epoch", 1.5)):  # fmt: skip
        with pytest.raises(ConfigError, match=f"'model.{key}'"):
            schedule.check_batch_size(OmegaConf.create({**MODEL, key: value}))


@pytest.mark.parametrize("batches, want", [(17_578, 100), (5000, 100), (488, 9), (57, 1), (3, 1)])
def test_auto_search_every(batches, want):
    assert schedule.search_every(SEARCH, batches) == want


def test_explicit_search_every_and_bad_value():
    assert schedule.search_every(OmegaConf.create({**SEARCH, "search_every": 7}), 10_000) == 7
    with pytest.raises(ConfigError, match="'search.search_every'"):
        schedule.check_search_every(OmegaConf.create({**SEARCH, "search_every": 0}))


def test_prior_logit_is_the_log_odds():
    assert schedule.prior_logit(0.2) == pytest.approx(math.log(0.25))
    assert schedule.prior_logit(None) is None
    assert math.isfinite(schedule.prior_logit(0.0)) and math.isfinite(schedule.prior_logit(1.0))


def test_output_bias_starts_at_the_base_rate():
    from ihas_lightning.modules.ctr import CTRModule

    m = CTRModule([5, 7], {"embed_dim": 4, "hidden": [8, 4]}, output_bias=schedule.prior_logit(0.1))
    torch.nn.init.zeros_(m.model.mlp.net[-1].weight)  # isolate the bias
    p = torch.sigmoid(m(torch.zeros(3, 2, dtype=torch.int32)))
    torch.testing.assert_close(p, torch.full((3,), 0.1))


def test_pretraining_ends_on_patience_restores_the_best_weights_and_bounds_the_search():
    from ihas_lightning.modules.search import SearchModule, SearchSchedule

    m = SearchModule([5, 7], {"embed_dim": 4, "hidden": [8, 4]}, {"tau": 0.1, "bins": 10}, search_every=1)
    assert m.search_start_epoch is None and m.in_pretrain(5)
    cb = SearchSchedule(pretrain_max_epochs=10, pretrain_patience=1, search_max_epochs=2)
    trainer = SimpleNamespace(current_epoch=0, callback_metrics={"val/logloss": torch.tensor(0.5)},
                              should_stop=False, global_step=0)  # fmt: skip
    cb.on_train_epoch_end(trainer, m)
    best = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(1.0)  # epoch 1 moves the weights and gets worse
    trainer.current_epoch, trainer.callback_metrics = 1, {"val/logloss": torch.tensor(0.6)}
    cb.on_train_epoch_end(trainer, m)
    assert m.search_start_epoch == 2 and not m.in_pretrain(2) and m.in_pretrain(1)
    assert all(torch.equal(best[k], v) for k, v in m.state_dict().items())  # epoch 0's weights are back
    trainer.current_epoch = 2
    cb.on_train_epoch_end(trainer, m)
    assert not trainer.should_stop
    trainer.current_epoch = 3  # the second search epoch: search_max_epochs reached
    cb.on_train_epoch_end(trainer, m)
    assert trainer.should_stop


def test_fixed_pretraining_length_ends_at_max_epochs():
    from ihas_lightning.modules.search import SearchModule, SearchSchedule

    m = SearchModule([5, 7], {"embed_dim": 4, "hidden": [8, 4]}, {"tau": 0.1, "bins": 10})
    cb = SearchSchedule(pretrain_max_epochs=3, pretrain_patience=None, search_max_epochs=5)
    for epoch in range(3):
        trainer = SimpleNamespace(current_epoch=epoch, callback_metrics={"val/logloss": torch.tensor(0.1 * epoch)},
                                  should_stop=False, global_step=0)  # fmt: skip
        cb.on_train_epoch_end(trainer, m)
    assert m.search_start_epoch == 3
