"""Launched by test_distributed.py under torchrun (gloo, CPU): one DistributedDataParallel pretraining step per
task on this rank's half of a fixed global batch, through the same `compute_loss` / `guarded_update` the
pretraining loop runs; rank 0 writes the parameters to OUT/<task>.pt. The test repeats the step in one process
on the whole batch and compares. Also checks that sharded batches are the ranks' halves of the global batch."""
import sys
from pathlib import Path

import torch

from world_model import distributed
from world_model.config import PretrainConfig, load_config
from world_model.pretrain import GeneratedScenes, build_model, compute_loss, guarded_update

TASKS = ("setpred", "discovery")
GLOBAL_BATCH = 4


def tiny_config(task: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [
        f"task={task}", "model.num_slots=3", "model.slot_dim=8", "model.mlp_hidden=16", "model.cnn_channels=[8,8]",
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
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, stats, _ = compute_loss(step_model, cfg.task, batch, cfg.model.vq.beta)
    assert guarded_update(loss, list(model.parameters()), opt, 1.0, stats) is None


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
    distributed.barrier()  # as run.py does: no rank tears down its gloo connections while a peer still uses them
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
