"""The same LSTM classifier in a plain PyTorch loop, its gradient flow through time by rnnlab.watch.

    python examples/plain_loop.py

Inside ``with rnnlab.watch(model) as flow:`` the model's nn.LSTM runs step by step on its own
weights with a probe on every state; outside it, the fused kernel runs untouched.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from lstm_classifier import LSTMClassifier, first_sign_data

import rnnlab


def main(out: str | Path = "outputs/plain_loop", seq_len: int = 100, steps: int = 200,
         hidden: int = 64, batch_size: int = 32, every_n_steps: int = 50) -> dict:
    """Train; return the last watched step's profiles ({"lstm": {"dL_dh": …, "dL_dc": …}})."""
    torch.manual_seed(0)
    model = LSTMClassifier(hidden=hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = first_sign_data(steps * batch_size, seq_len, 8)
    profiles = {}
    for step, (x, y) in enumerate(torch.utils.data.DataLoader(data, batch_size=batch_size)):
        optimizer.zero_grad()
        if step % every_n_steps == 0:
            with rnnlab.watch(model) as flow:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            flow.save(Path(out) / "grad_flow", step)
            profiles = flow.profiles()
        else:
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return profiles


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=100)
    args = parser.parse_args()
    dL_dh = main(seq_len=args.seq_len)["lstm"]["dL_dh"]
    print("||dL/dh_t|| at t = 0 and T-1, per layer:", dL_dh[:, [0, -1]].tolist())
