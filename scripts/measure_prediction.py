"""How well the Lyapunov spectrum predicts the measured decay of trained cells, by length.

    python scripts/measure_prediction.py                          # tanh RNN, GRU, LSTM
    python scripts/measure_prediction.py --cells gru --eval-lens 50 1000 --seeds 7 8 9

Each cell (float64, hidden 32, encoder 4) is trained by Adam (lr 3e-3) on the adding task at
``--train-len`` for ``--steps`` steps, batches of 32, the loss read at the last step. Then, on a
fresh batch of 32 sequences of each length in ``--eval-lens`` (the same trained cell), one
`rnnlab.gradflow.grad_flow` call gives the measured ``decay_rate`` of ‖∂L/∂z_t‖, the
``predicted_decay_rate`` of the spectrum's running prediction and λ₁, the batch-mean top
exponent (k = 8, QR every step). Printed: the three rates in log10 per step and each
prediction's relative error.

The exponents are asymptotic rates: the first vector of the backward QR pass starts in a fixed
random direction and ∂L/∂z_{T−1} in the readout's; both take some steps to align with the top
Lyapunov vector, and where the top exponents nearly coincide (the gated cells) that takes
hundreds of steps, so the prediction's error falls with the length of the window.
"""

from __future__ import annotations

import argparse

import torch
from omegaconf import OmegaConf

from rnnlab import gradflow
from rnnlab.config import CONF_DIR
from rnnlab.model import RecurrentModel
from rnnlab.tasks import Adding

BATCH = 32


def adding_batches(T: int, seed: int):
    """Float64 adding batches of `BATCH` sequences of length ``T`` from one seeded generator."""
    task, generator = Adding(seq_len=T, batch_size=BATCH), torch.Generator().manual_seed(seed)
    while True:
        yield {k: v.double() for k, v in task.generate(BATCH, generator).items()}


def train_on_adding(cell: dict, T: int = 50, steps: int = 300, seed: int = 0) -> RecurrentModel:
    """A float64 model around the cell config ``cell`` trained by Adam on the adding task at
    length ``T``."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = RecurrentModel(cell=cell, input_size=2, output_size=1, n_out=1, loss="mse",
                               encoder_size=4)
    finally:
        torch.set_default_dtype(previous)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    batches = adding_batches(T, seed + 1)
    for _ in range(steps):
        batch = next(batches)
        loss = model.loss_fn(model(batch["x"]), batch["y"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def compare(model: RecurrentModel, T: int, seed: int, k: int = 8) -> dict[str, float]:
    """Measured and predicted decay rates of ``model`` on one fresh adding batch of length T."""
    record = gradflow.grad_flow(model, next(adding_batches(T, seed)), lyapunov_k=k)
    return {"measured": record.summary.decay_rate,
            "predicted": float(record.lyapunov.predicted_decay_rate),
            "lambda_1": float(record.lyapunov.lyapunov[0])}


def cell_config(name: str, hidden_size: int) -> dict:
    config = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "cell" / f"{name}.yaml"))
    return {**config, "hidden_size": hidden_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", nargs="+", default=["rnn", "gru", "lstm"])
    parser.add_argument("--train-len", type=int, default=50)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--eval-lens", type=int, nargs="+", default=[50, 200, 500, 1000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[7])
    args = parser.parse_args()
    print(f"{'cell':6} {'T':>6} {'seed':>5} {'measured':>10} {'predicted':>10} {'error':>7} "
          f"{'lambda_1':>10} {'error':>7}")
    for name in args.cells:
        model = train_on_adding(cell_config(name, args.hidden_size), args.train_len, args.steps)
        for T in args.eval_lens:
            for seed in args.seeds:
                r = compare(model, T, seed)
                print(f"{name:6} {T:6d} {seed:5d} {r['measured']:10.5f} {r['predicted']:10.5f} "
                      f"{r['predicted'] / r['measured'] - 1:+7.1%} {r['lambda_1']:10.5f} "
                      f"{r['lambda_1'] / r['measured'] - 1:+7.1%}", flush=True)


if __name__ == "__main__":
    main()
