"""Peak memory and time of one forward + backward of the neural ODE cell, direct against adjoint.

    python scripts/measure_adjoint_memory.py                      # T = 1000 and 4000
    python scripts/measure_adjoint_memory.py --seq-lens 100 1000 --solver rk4

Each configuration runs in a fresh process (CPU, one thread) and reports the growth of its peak
resident memory (VmHWM, reset before the pass) over the memory held before the pass, the
process's whole peak (torch, the model, the inputs and the pass: "process"), and how far
the gradient of g's parameters is from the exact gradient of the discrete scheme (backprop through
manual Euler for euler, through the same solver otherwise). The wall time comes from a second
fresh process with the default allocator (the first one's allocator settings, which make the
resident set follow the live tensors, slow down paths that allocate many tensors).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PATHS = {  # name → cell arguments; "step" loops over cell.step, "sequence" calls cell.sequence
    "direct, manual Euler (step)": ({"solver": "manual_euler"}, "step"),
    "direct, odeint per interval (step)": ({}, "step"),
    "direct, one odeint (sequence)": ({"whole_sequence": True}, "sequence"),
    "adjoint, odeint_adjoint per interval (step)": ({"adjoint": True}, "step"),
}
WHOLE_GRID = "adjoint, whole grid, segments of {}"  # + `--segments`: cell.adjoint_segment


def path_settings(name: str) -> tuple[dict, str]:
    if name in PATHS:
        return PATHS[name]
    segment = int(name.rsplit(" ", 1)[-1].replace("T", "0"))
    return {"adjoint": True, "whole_sequence": True, "adjoint_segment": segment}, "inputs"


# glibc serves allocations of 16 KiB and more (every tensor of B×hidden floats here) by mmap and
# unmaps them when freed, so the resident set follows the live tensors instead of what the
# allocator keeps cached (its default threshold adapts upwards and would hide frees).
CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384"}


def memory_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """One forward + backward in this process; print a JSON line, save the gradient."""
    import torch

    from rnnlab.cells import NeuralODE

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cell_args, path = path_settings(args.path)
    cell = NeuralODE(args.input_size, args.hidden_size, width=args.width, depth=args.depth,
                     dt=args.dt, **{"solver": args.solver, **cell_args})
    target = torch.randn(args.batch_size, args.hidden_size)

    def forward_backward(u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if path == "step":
            state = cell.init_state(args.batch_size)
            for u_t in u.unbind(1):
                state = cell.step(u_t, state, None)
            z_last = state[0]
        elif path == "sequence":
            z_last = cell.sequence(u, cell.init_state(args.batch_size))[1][0]
        else:  # the encoder (here the identity) inside g: no gradient for u
            z_last = cell.sequence_from_inputs(u, torch.nn.Identity(),
                                               cell.init_state(args.batch_size), 1)[:, -1]
            loss = (z_last - target).square().mean()
            return (None, *torch.autograd.grad(loss, list(cell.parameters())))
        loss = (z_last - target).square().mean()
        return torch.autograd.grad(loss, [u, *cell.parameters()])

    # A short warm-up pass first, so that one-time allocations do not count.
    forward_backward(torch.randn(args.batch_size, 3, args.input_size, requires_grad=True))
    cell.diagnostics()
    u = torch.randn(args.batch_size, args.seq_len, args.input_size, requires_grad=True)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = memory_kib("VmRSS")
    start = time.perf_counter()
    grads = forward_backward(u)
    seconds = time.perf_counter() - start
    peak = memory_kib("VmHWM")
    np.save(args.save, torch.cat([g.flatten() for g in grads[1:]]).double().numpy())
    print(json.dumps({"peak_mib": (peak - before) / 1024, "process_mib": peak / 1024,
                      "seconds": seconds,
                      "nfe": cell.diagnostics()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--solver", default="euler")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--dt", type=float, default=0.05)
    parser.add_argument("--segments", nargs="*", default=["T"],
                        help="cell.adjoint_segment values of the whole-grid adjoint (T: one "
                             "segment, 0 in the config)")
    parser.add_argument("--skip", nargs="*", default=[], help="path names to leave out")
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)  # child only
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.path:
        return child(args)

    print(f"neural ODE cell, solver={args.solver}, B={args.batch_size}, input={args.input_size}, "
          f"hidden={args.hidden_size}, g: {args.depth}×{args.width} tanh MLP, dt={args.dt}; "
          "one forward + backward, CPU, 1 thread")
    print(f"{'T':>5}  {'path':<45} {'peak MiB':>9} {'process':>8} {'seconds':>8} "
          f"{'NFE fwd/bwd':>12} {'grad rel. diff':>14}")
    names = [*PATHS, *(WHOLE_GRID.format(k) for k in args.segments)]
    reference = "direct, manual Euler (step)" if args.solver == "euler" else \
        "direct, odeint per interval (step)"  # the exact gradient of the discrete scheme
    settings = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                if k in ("solver", "batch_size", "input_size", "hidden_size", "width", "depth",
                         "dt")]
    with tempfile.TemporaryDirectory() as tmp:
        for T in args.seq_lens:
            exact = None
            for name in names:
                if name in args.skip or (name.startswith("direct, manual") and
                                         args.solver != "euler"):
                    continue
                save = Path(tmp) / "grad.npy"
                command = [sys.executable, __file__, "--path", name, "--seq-len", str(T),
                           "--save", str(save), *settings]
                memory = subprocess.run(command, capture_output=True, text=True, env=CHILD_ENV)
                timing = subprocess.run(command, capture_output=True, text=True)
                failed = next((r for r in (memory, timing) if r.returncode != 0), None)
                if failed is not None:
                    print(f"{T:>5}  {name:<45} failed: {failed.stderr.strip()[-300:]}")
                    continue
                out = json.loads(memory.stdout.strip().splitlines()[-1])
                seconds = json.loads(timing.stdout.strip().splitlines()[-1])["seconds"]
                grad = np.load(save)
                if name == reference:
                    exact = grad
                diff = "n/a" if exact is None else \
                    f"{np.linalg.norm(grad - exact) / np.linalg.norm(exact):.2e}"
                nfe = f"{out['nfe']['nfe_forward']:.0f}/{out['nfe']['nfe_backward']:.0f}"
                print(f"{T:>5}  {name:<45} {out['peak_mib']:>9.1f} {out['process_mib']:>8.0f} "
                      f"{seconds:>8.2f} {nfe:>12} {diff:>14}", flush=True)


if __name__ == "__main__":
    main()
