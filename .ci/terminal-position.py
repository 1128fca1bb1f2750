"""Does the continuation head learn where an episode ends, or only at which segment position it ends?

A toy game of slot codes: two slots show random codes in {0, 1, 2}; taking action 1 (rare, 15%) while slot 0 shows
code 2 ends the episode. A small dynamics transformer is trained on replayed segments, once with segments that
must fit inside their episode (`pad=False`: every terminal lands at the segment's last position) and once with
training segments as the agent samples them (`pad=True`: any start, padded past the episode's end, padded steps
masked). Printed: P(continue) after the deadly action at segment position 0, where imagination starts, and at the
last position, beside the safe action at position 0 (the true values: 0, 0 and 1).

    python .ci/terminal-position.py [--steps 1500] [--seeds 0,1]     # about 9 minutes a row on 2 CPU cores
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent.replay import ReplayBuffer  # noqa: E402
from world_model.dynamics import DynamicsConfig, SlotDynamics, dynamics_loss  # noqa: E402

T = 16


def episode(rng: np.random.Generator) -> dict:
    codes, actions, terminal = [rng.integers(0, 3, 2)], [0], [False]
    while len(codes) < 200:
        a = int(rng.random() < 0.15)
        if codes[-1][0] == 2 and a == 1:
            codes.append(np.array([3, 3])), actions.append(a), terminal.append(True)
            break
        codes.append(rng.integers(0, 3, 2)), actions.append(a), terminal.append(False)
    n = len(codes)
    first, last = np.zeros(n, bool), np.zeros(n, bool)
    first[0], last[-1] = True, True
    return {"image": np.stack(codes), "action": np.array(actions), "reward": np.zeros(n, np.float32),
            "is_first": first, "is_last": last, "is_terminal": np.array(terminal)}


def run(pad: bool, steps: int, seed: int) -> tuple[float, float, float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer(200_000, {"image": ((2,), np.int64)}, seed=seed)
    for _ in range(3000):
        buf.add_episode(episode(rng))
    cfg = DynamicsConfig(num_slots=2, num_vars=1, num_codes=4, frame_vars=0, num_actions=2, embed_dim=64, layers=2,
                         heads=4, max_steps=T)
    dyn = SlotDynamics(cfg)
    opt = torch.optim.Adam(dyn.parameters(), 3e-4)
    for _ in range(steps):
        s = buf.sample(64, T, pad=pad)
        codes = torch.as_tensor(s["image"])[..., None]  # b t k v
        act = torch.as_tensor(s["action"])
        act = torch.cat([act[:, 1:], torch.zeros_like(act[:, :1])], 1)  # step t's input: the action after frame t
        cont = 1 - torch.as_tensor(s["is_terminal"]).float()
        valid = torch.as_tensor(s["valid"]) if pad else None
        loss, _ = dynamics_loss(dyn(codes, None, act), codes, None, torch.as_tensor(s["reward"]), cont, valid)
        opt.zero_grad()
        loss.backward()
        opt.step()
    dyn.eval()
    with torch.no_grad():
        deadly = torch.tensor([[[[2], [1]]]])  # slot 0 shows code 2
        at0 = torch.sigmoid(dyn(deadly, None, torch.tensor([[1]])).cont_logits[0, -1]).item()
        safe = torch.sigmoid(dyn(deadly, None, torch.tensor([[0]])).cont_logits[0, -1]).item()
        history = torch.randint(0, 3, (1, T - 1, 2, 1), generator=torch.Generator().manual_seed(seed))
        history[0, -1] = deadly[0, 0]
        a = torch.zeros(1, T - 1, dtype=torch.long)
        a[0, -1] = 1
        at_last = torch.sigmoid(dyn(history, None, a).cont_logits[0, -1]).item()
    return at0, at_last, safe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--seeds", default="0,1")
    args = p.parse_args()
    torch.set_num_threads(2)
    print(f"{'segments':<34}{'seed':>5}{'deadly, position 0':>20}{f'deadly, position {T - 2}':>21}{'safe, position 0':>18}")
    for pad, name in ((False, "inside the episode (pad=False)"), (True, "padded past its end (pad=True)")):
        for seed in (int(s) for s in args.seeds.split(",")):
            at0, at_last, safe = run(pad, args.steps, seed)
            print(f"{name:<34}{seed:>5}{at0:>20.3f}{at_last:>21.3f}{safe:>18.3f}")


if __name__ == "__main__":
    main()
