"""A non-finite loss or gradient: stop training, or skip that optimizer step.

One policy, ``monitor.on_nonfinite`` (``stop`` or ``skip``), applied by the gradient-flow callback
to two faults:

- a non-finite loss: the forward pass overflowed; ``stop`` raises a `FloatingPointError`,
  ``skip`` drops the step's gradients;
- non-finite gradients with a finite loss: the backward pass overflowed; the message names the
  timesteps where ‖∂L/∂z_t‖ is not finite when the step was monitored.

Both are seen after the backward pass, from the loss and the per-module gradient norms together
(`NonFinitePolicy.finite`: one host read a step) — a step with a non-finite loss still runs its
backward pass, which under data parallelism every process takes part in.

A skipped step leaves every parameter and the optimizer's state as they were (the optimizer skips
a parameter without a gradient). Under data parallelism every process decides alike: the loss's
finiteness is agreed on by all processes, and the gradients are the same after DDP's all-reduce.
Skipped steps are counted as ``train/skipped_steps`` (also in metrics.json); after
``max_skipped_steps`` skipped in a row (default ``auto``: 10% of the run's steps, at least 10)
training stops, since its parameters are no longer moving.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from rnnlab.config import require, require_choice

log = logging.getLogger(__name__)

ACTIONS = ("stop", "skip")


class NonFinitePolicy:
    """Args:
        action: ``stop`` or ``skip`` (``monitor.on_nonfinite``).
        max_skipped_steps: stop once this many steps in a row were skipped (None: never;
            ``"auto"``: `auto_max_skipped` of the run's steps, set by `set_run_steps`).
    """

    def __init__(self, action: str = "stop", max_skipped_steps: int | str | None = None):
        self.action = require_choice("monitor.on_nonfinite", action, ACTIONS)
        counted = (isinstance(max_skipped_steps, int) and not isinstance(max_skipped_steps, bool)
                   and max_skipped_steps >= 1)
        require(max_skipped_steps in (None, "auto") or counted, "monitor.max_skipped_steps",
                max_skipped_steps, "auto, null or an integer >= 1")
        self.auto = max_skipped_steps == "auto"
        self.max_skipped_steps = None if self.auto else max_skipped_steps
        self.skipped_steps = 0  # over the whole run
        self.skipped_in_a_row = 0

    def set_run_steps(self, steps: float) -> None:
        """With ``max_skipped_steps="auto"``: the limit for a run of ``steps`` optimizer steps."""
        if self.auto:
            self.max_skipped_steps = auto_max_skipped(steps)

    def finite(self, trainer: pl.Trainer, loss: Tensor | None,
               norms: Tensor) -> tuple[bool, bool]:
        """After the backward pass: (is the loss finite on every process, are the gradients
        finite), from the loss and the gradient norms ``norms`` (any shape: a norm is finite
        when every gradient it covers is). One host read per step where both are, on one
        process: the loss added to the norms' sum (float64, which no finite norm of float32 or
        lower gradients overflows) is finite then and only then (the policy has to decide
        before the optimizer runs); under data parallelism the loss's finiteness is agreed on
        by every process, and the gradients are the same after DDP's all-reduce. ``loss``
        None: not checked."""
        check = norms.sum(dtype=torch.float64)
        if loss is not None:
            check.add_(loss.detach().reshape(()))
        if trainer.world_size == 1 and math.isfinite(check.item()):
            self.skipped_in_a_row = 0
            return True, True
        loss_value = (loss.detach().to(torch.float64).reshape(()) if loss is not None
                      else check.new_zeros(()))
        loss_finite, gradients_finite = torch.isfinite(
            torch.stack((loss_value, norms.sum(dtype=torch.float64)))).tolist()
        if trainer.world_size > 1:
            loss_finite = trainer.strategy.reduce_boolean_decision(loss_finite, all=True)
        if loss_finite and gradients_finite:
            self.skipped_in_a_row = 0
        return loss_finite, gradients_finite

    def nonfinite(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor | None,
                  loss_finite: bool, norms: dict[str, Tensor], dL_dz: np.ndarray | None,
                  last_finite: str) -> None:
        """Apply the policy to a step `finite` found non-finite: ``stop`` raises; ``skip`` warns,
        counts the step and drops its gradients (the optimizer then leaves every parameter as
        it was). A non-finite loss is named as such (the forward pass overflowed, and the step
        has no profile); non-finite gradients with a finite loss by the module norms and, on a
        monitored step, the timesteps where ``dL_dz`` is not finite."""
        step = trainer.global_step
        if not loss_finite:
            value = float(loss.detach()) if loss is not None else float("nan")
            what = (f"non-finite training loss {value}" if not math.isfinite(value) else
                    f"non-finite training loss on another process (this one's: {value:.4g})")
            self.apply(pl_module, step, what,
                       "the forward pass overflowed, so this step has no gradient profile",
                       last_finite)
        else:
            named = ", ".join(f"{k.removeprefix('grad_norm_')} {float(v):.3g}"
                              for k, v in norms.items())
            self.apply(pl_module, step, f"non-finite gradients (norms: {named}) with a finite loss",
                       offending_timesteps(dL_dz), last_finite)
        for p in pl_module.parameters():  # the optimizer leaves a parameter without a gradient
            p.grad = None

    def apply(self, pl_module: pl.LightningModule, step: int, what: str, where: str,
              last_finite: str) -> None:
        """Raise (stop), or count the skipped step and warn (skip)."""
        message = nonfinite_message(step, what, where, last_finite, self.action)
        if self.action == "stop":
            raise FloatingPointError(message)
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        log.warning(message)
        pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True,
                      on_epoch=False)
        if self.max_skipped_steps is not None and self.skipped_in_a_row >= self.max_skipped_steps:
            raise FloatingPointError(
                f"{self.skipped_in_a_row} steps in a row skipped for non-finite values (the "
                f"last at step {step}); the parameters are no longer moving, so training stops "
                f"(monitor.max_skipped_steps={self.max_skipped_steps}). {ADVICE}")


def auto_max_skipped(steps: float) -> int:
    """10% of a run's steps in a row, at least 10 (a short run's few bad batches pass); 100 for a
    run of unbounded length."""
    if not math.isfinite(steps):
        return 100
    return max(10, math.ceil(0.1 * steps))


ADVICE = ("Lower model.optimizer.lr, clip gradients (trainer.gradient_clip_val=1.0) or use a "
          "smaller cell.gain")


def offending_timesteps(dL_dz: np.ndarray | None) -> str:
    """Where ||dL/dz_t|| (T,) is non-finite, or how to measure it on an unmonitored step."""
    if dL_dz is None:
        return ("the offending timesteps were not measured: this step was not monitored "
                "(set monitor.every_n_steps=1 to measure every step)")
    bad = (~np.isfinite(np.atleast_2d(dL_dz))).any(0)  # in any row of a torch.nn module's
    return (f"||dL/dz_t|| is non-finite at timesteps "
            f"{np.nonzero(bad)[0].tolist()} of T = {bad.shape[0]}")


def nonfinite_message(step: int, what: str, where: str, last_finite: str, action: str) -> str:
    """What went non-finite at ``step``, where in time, and the last finite profile."""
    outcome = ("skipped this step (monitor.on_nonfinite=skip)" if action == "skip" else
               "stopped (monitor.on_nonfinite=stop; set monitor.on_nonfinite=skip to skip such "
               "steps)")
    return (f"{what} at step {step}; {where}; last finite gradient profile: {last_finite}; "
            f"{outcome}. {ADVICE}")
