"""The search's training rows by phase: the pretraining (gates open) fits every TRAIN row, exactly as
the Base model does; the search phase's model steps skip the rows held out for the gate.

With ``search.gate_data=holdout`` the gate steps draw from a seeded share of the TRAIN rows that the
model's search-phase steps never see (so validation stays clean for selection). The pretraining has
no gate step, so holding those rows out there only makes the gates-open model worse than Base: on a
1%-CTR sample 10% fewer rows are 10% fewer positives. With every row, the same seed and the same
budget the pretrained model *is* Base (same init, same batches, same early stop), which is what the
no-harm selection (``method.select=sparsest``) compares with and falls back to.

The Trainer reloads the train loader every epoch (``reload_dataloaders_every_n_epochs=1``) and the
loader follows ``lightning_module.in_pretrain()`` at that moment.
"""

from __future__ import annotations

from typing import Any

from .batches import BatchLoader
from .datamodule import IHASDataModule


class PhasedTrainData(IHASDataModule):
    """An :class:`IHASDataModule` over every row whose train loader, once the search phase starts,
    is ``search_rows``' (the same prepared dir with the gate's holdout filtered out)."""

    def __init__(self, prepared_dir: Any, *, search_rows: IHASDataModule, **kwargs: Any):
        super().__init__(prepared_dir, **kwargs)
        self.search_rows = search_rows

    def in_pretrain(self) -> bool:
        trainer = self.trainer
        if trainer is None:
            return True
        return bool(trainer.lightning_module.in_pretrain(trainer.current_epoch))

    def train_dataloader(self) -> BatchLoader:
        if self.in_pretrain():
            return super().train_dataloader()
        self.search_rows.trainer = self.trainer  # its shuffle follows the fit's epochs, its shard the rank
        return self.search_rows.train_dataloader()
