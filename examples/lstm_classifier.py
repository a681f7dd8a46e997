"""A user's ordinary LightningModule — a 2-layer LSTM classifier — watched by rnnlab's callback.

    python examples/lstm_classifier.py                 # T = 100, 300 steps: a minute on a CPU
    python examples/lstm_classifier.py --seq-len 400   # where the first layer's gradient vanishes

The task needs memory: the label is the sign of the first timestep's first feature, and the rest of
the sequence is noise. Nothing in the model knows about rnnlab; adding the callback to the Trainer
records ‖∂L/∂h_t‖ and ‖∂L/∂c_t‖ of both layers at every timestep on step 0 and every 25th step, into
``<out>/grad_flow/lstm/`` (two steps' records a file, ``steps_*.npz``: `rnnlab.gradflow.load`
reads them) and TensorBoard.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rnnlab


class LSTMClassifier(pl.LightningModule):
    """x (B, T, features) → logits (B, classes) from the last layer's last output."""

    def __init__(self, features: int = 8, hidden: int = 64, classes: int = 2, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.lstm = nn.LSTM(features, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.lstm(x)
        return self.head(output[:, -1])

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def first_sign_data(size: int, seq_len: int, features: int, seed: int = 0) -> TensorDataset:
    """Random sequences labelled by the sign of their first value."""
    x = torch.randn(size, seq_len, features, generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x, (x[:, 0, 0] > 0).long())


def main(out: str | Path = "outputs/lstm_classifier", seq_len: int = 100, steps: int = 300,
         hidden: int = 64, batch_size: int = 32, every_n_steps: int = 25) -> Path:
    """Train and return the directory of the records."""
    rnnlab.tune_malloc()  # a step's large buffers reused, not mapped anew (glibc; else a no-op)
    pl.seed_everything(0)
    out = Path(out)
    data = DataLoader(first_sign_data(64 * batch_size, seq_len, 8), batch_size=batch_size,
                      shuffle=True)
    trainer = pl.Trainer(max_steps=steps, logger=TensorBoardLogger(out, name="tensorboard"),
                         callbacks=[rnnlab.GradFlowCallback(out / "grad_flow",
                                                            every_n_steps=every_n_steps)],
                         enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(LSTMClassifier(hidden=hidden), data)
    return out / "grad_flow"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/lstm_classifier")
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    records = main(args.out, args.seq_len, args.steps)
    flow = rnnlab.gradflow.load(records, module="lstm")
    first, last = flow["dL_dh"][-1, :, 0], flow["dL_dh"][-1, :, -1]
    for row, a, b in zip(flow["rows"], first, last):
        print(f"{row}: ||dL/dh_0|| = {a:.3g}, ||dL/dh_(T-1)|| = {b:.3g} at step {flow['step'][-1]}")
    print(f"Records: {records}/lstm   TensorBoard: tensorboard --logdir {args.out}")
