"""Launched by test_distributed.py under torchrun (gloo, CPU): two DistributedDataParallel pretraining steps per
task on this rank's half of a fixed global batch, through the same `compute_loss` / `guarded_update` the
pretraining loop runs, and one world-model update on padded replay segments as the agent loop runs it; rank 0
writes the parameters to OUT/<task>.pt. The test repeats each step in one process on the whole batch and
compares. Also checks that sharded batches are the ranks' halves of the global batch."""
import sys
from pathlib import Path

import torch

from agent.config import AgentConfig
from agent.train import build_agent
from world_model import distributed
from world_model.config import PretrainConfig, load_config
from world_model.pretrain import build_model, compute_loss
from world_model.sources import GeneratedScenes
from world_model.updates import guarded_update
from world_model.wm import WorldModel, WorldModelLoss

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("setpred", "discovery", "discovery-implicit")  # the last: model.implicit_grad=true
GLOBAL_BATCH = 4


def tiny_config(task: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [
        f"task={task.split('-')[0]}", f"model.implicit_grad={task.endswith('-implicit')}", "model.num_slots=3", "model.slot_dim=8", "model.mlp_hidden=16", "model.cnn_channels=[8,8]",
        "model.cnn_strides=[2,2]", "model.feature_dim=8", "model.head_hidden=16", "model.decoder_channels=8",
        "data.resolution=16", "data.max_objects=3", "data.pool=8"])


def init_model(cfg: PretrainConfig) -> torch.nn.Module:
    """Same weights on every process; the slot-init noise scaled to nothing (exp(-60)), so the step is a
    deterministic function of the batch and the two runs are comparable sample for sample."""
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        model.encoder.slot_module.mu_logstd.fill_(-60.0)
        model.encoder.slot_module.logsigma_logstd.fill_(-60.0)
    return model


def global_batch(cfg: PretrainConfig, sharded: bool = False) -> dict:
    return GeneratedScenes(cfg, torch.device("cpu"), sharded=sharded).batch(GLOBAL_BATCH, seed=5)


def train_step(step_model: torch.nn.Module, model: torch.nn.Module, cfg: PretrainConfig, batch: dict) -> None:
    """Two Adam updates on the batch (DistributedDataParallel checks at the second that every parameter it expects
    a gradient for got one at the first)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss, stats, _ = compute_loss(step_model, cfg.task, batch, cfg.model.vq.beta)
        assert guarded_update(loss, list(model.parameters()), opt, 1.0, stats) is None


def init_world_model() -> WorldModel:
    """The tiny agent preset's world model, the same on every process; its slot-init noise scaled to nothing and
    its codes argmax (the VQ and the frame tokenizer in eval mode), so the update is a function of the batch."""
    cfg = load_config(AgentConfig, ROOT / "configs/tiny.yaml", [])
    torch.manual_seed(0)
    wm, _ = build_agent(cfg, 17, torch.device("cpu"))
    with torch.no_grad():
        wm.autoencoder.encoder.slot_module.mu_logstd.fill_(-60.0)
        wm.autoencoder.encoder.slot_module.logsigma_logstd.fill_(-60.0)
    return wm


def wm_batch() -> dict:
    """4 replayed segments of 5 steps: rank 0's two unpadded, rank 1's padded past an early episode end."""
    g = torch.Generator().manual_seed(3)
    b, t = GLOBAL_BATCH, 5
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    return {"images": torch.rand(b, t, 3, 32, 32, generator=g), "action": torch.randint(17, (b, t), generator=g),
            "reward": torch.randn(b, t, generator=g), "is_terminal": torch.zeros(b, t, dtype=torch.bool),
            "valid": valid}


def wm_step(step_module: torch.nn.Module, wm: WorldModel, batch: dict) -> None:
    """One world-model update as `agent.train.train_step` makes it, with plain SGD (Adam's first step would hide
    how the ranks' gradients are weighed)."""
    wm.train()
    wm.autoencoder.encoder.vq.eval()
    wm.frame_tokenizer.eval()
    opt = torch.optim.SGD([p for p in wm.parameters() if p.requires_grad], lr=0.5)
    loss, stats, _ = step_module(batch, 0.5)
    assert guarded_update(loss, opt.param_groups[0]["params"], opt, 1e3, stats) is None


def main(out: Path) -> None:
    distributed.setup("cpu")
    torch.set_num_threads(1)
    assert distributed.world_size() == 2
    for task in TASKS:
        cfg = tiny_config(task)
        full, mine = global_batch(cfg), global_batch(cfg, sharded=True)
        lo, hi = distributed.shard_bounds(GLOBAL_BATCH)
        for k in full:
            assert torch.equal(mine[k], full[k][lo:hi]), k
        model = init_model(cfg)
        train_step(distributed.wrap(model, torch.device("cpu")), model, cfg, mine)
        if distributed.is_main():
            torch.save(model.state_dict(), out / f"{task}.pt")
    wm = init_world_model()
    lo, hi = distributed.shard_bounds(GLOBAL_BATCH)
    wm_step(distributed.wrap(WorldModelLoss(wm), torch.device("cpu")), wm, {k: v[lo:hi] for k, v in wm_batch().items()})
    if distributed.is_main():
        torch.save(wm.state_dict(), out / "wm.pt")
    distributed.barrier()  # as run.py does: no rank tears down its gloo connections while a peer still uses them
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
