"""Aten operations per agent update, per profiler label, and per frame of the GMM slot module (forward, backward).

On a GPU an eager loop this small is bound by kernel launches, so the operation count, measured here on the CPU,
predicts where the time goes (issue 6). Counts a TorchDispatchMode sees: ops after autograd, views included in the
totals; "kernels" leaves out the view-only ops. From the project root:
    python .ci/count-ops.py [key=value overrides of configs/crafter.yaml]
"""
import collections
import contextlib
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import agent.train as train  # noqa: E402
from agent.config import AgentConfig  # noqa: E402
from agent.replay import ReplayBuffer  # noqa: E402
from world_model.config import load_config  # noqa: E402
from world_model.updates import StepMeans  # noqa: E402

VIEWS = {"view", "t", "permute", "unsqueeze", "squeeze", "transpose", "expand", "slice", "as_strided", "detach",
         "_unsafe_view", "select", "split", "split_with_sizes", "unbind", "alias", "reshape"}


class Count(TorchDispatchMode):
    """Counts every aten op under the current label."""

    def __init__(self, label):
        super().__init__()
        self.label, self.ops = label, collections.defaultdict(collections.Counter)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[self.label[0]][func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def kernels(ops: collections.Counter) -> int:
    return sum(n for name, n in ops.items() if name not in VIEWS)


def main(overrides: list[str]) -> None:
    label = ["other"]

    @contextlib.contextmanager
    def record_function(name):  # stands in for the profiler labels of agent.train.train_step
        old, label[0] = label[0], name
        try:
            yield
        finally:
            label[0] = old

    train.record_function = record_function
    small = ["train.device=cpu", "train.batch_size=2", "train.imag_starts=4", "encoder.model.cnn_channels=[4,4,4,4]",
             "train.compile=false"]  # the eager ops (crafter.yaml compiles since a05e016)
    cfg = load_config(AgentConfig, ROOT / "configs/crafter.yaml", small + overrides)  # small tensors, same ops
    wm, ac = train.build_agent(cfg, 17, torch.device("cpu"))
    opt = torch.optim.Adam([p for p in wm.parameters() if p.requires_grad], lr=1e-4)
    n, rng = 4 * cfg.train.seq_len, np.random.default_rng(0)
    replay = ReplayBuffer(n, {"image": ((64, 64, 3), np.uint8)})
    replay.add_steps({"image": rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8), "action": rng.integers(0, 17, n),
                      "reward": np.zeros(n, np.float32), "is_first": np.arange(n) == 0, "is_last": np.zeros(n, bool),
                      "is_terminal": np.zeros(n, bool)}, [0] * n)
    train.train_step(wm, ac, opt, replay, cfg, torch.device("cpu"), 0)  # first update: lazy state out of the way
    counter = Count(label)
    with counter:
        stats = train.train_step(wm, ac, opt, replay, cfg, torch.device("cpu"), 1)
    label[0] = "log_means"  # the training loop's per-update bookkeeping of these stats for the next log row
    with counter:
        StepMeans().add(stats)
    total = sum(sum(c.values()) for c in counter.ops.values())
    print(f"# one agent update, configs/crafter.yaml {' '.join(overrides)} (seq_len {cfg.train.seq_len}, "
          f"horizon {cfg.actor_critic.horizon}): {total} aten ops")
    for name, ops in counter.ops.items():
        print(f"{name:<14}{sum(ops.values()):>8} ops {kernels(ops):>8} kernels")
    slots = wm.autoencoder.encoder.slot_module
    feats = torch.randn(2, 64, slots.norm_input.normalized_shape[0], requires_grad=True)
    prev = slots.initial_slots(2, "cpu").detach().requires_grad_()
    forward, backward = Count(["forward"]), Count(["backward"])
    with forward:
        out, attn = slots(feats, prev)
    with backward:
        (out.sum() + attn.sum()).backward()
    print(f"slot module, one carried frame: {kernels(forward.ops['forward'])} kernels forward, "
          f"{kernels(backward.ops['backward'])} backward")


if __name__ == "__main__":
    main(sys.argv[1:])
