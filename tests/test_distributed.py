"""Data parallelism under torchrun (2 gloo processes on CPU): DDP steps equal single-process steps on the
concatenated batch (also with model.implicit_grad, whose frozen slot-init parameters DDP must not wait for); `run.py pretrain` and `run.py train` run under torchrun, only rank 0 writes, and a
run resumes at another world size."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ddp_worker
import run
from agent.config import AgentConfig
from agent.replay import ReplayBuffer
from agent.train import updates_due
from world_model import distributed
from world_model.config import PretrainConfig, load_config
from world_model.rundir import RunDir, read_jsonl

ROOT = Path(__file__).resolve().parent.parent


def torchrun(args: list, nproc: int = 2, timeout: int = 300, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env_vars)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def signalled_torchrun(args: list, when: str, sig: int) -> str:
    """Two processes under torchrun, sent `sig` (to torchrun) once a line of its output starts with `when`; its
    stderr."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith(when):
                break
        proc.send_signal(sig)
        return proc.communicate(timeout=120)[1]
    finally:
        proc.kill()


def written_by_rank(audit_dir: Path, rank: int, run_dir: Path) -> list:
    """The files under `run_dir` that process `rank` of a `tests/audited_run.py` run opened for writing or renamed
    into (paths relative to it), each once."""
    lines = (audit_dir / f"written-rank{rank}.txt").read_text().splitlines()
    return sorted({os.path.relpath(p, run_dir) for p in lines if p.startswith(str(run_dir) + os.sep)})


@pytest.fixture(scope="module")
def ddp_steps(tmp_path_factory) -> Path:
    """The folder where one torchrun of ddp_worker.py left rank 0's parameters after each of its DDP steps."""
    out = tmp_path_factory.mktemp("ddp")
    torchrun([str(ROOT / "tests" / "ddp_worker.py"), str(out)])
    return out


def test_ddp_step_equals_single_process_step_on_concatenated_batch(ddp_steps):
    for task in ddp_worker.TASKS:
        cfg = ddp_worker.tiny_config(task)
        model = ddp_worker.init_model(cfg)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ddp_worker.train_step(model, model, cfg, ddp_worker.global_batch(cfg))
        ddp = torch.load(ddp_steps / f"{task}.pt")
        changed = 0
        for k, v in model.state_dict().items():
            torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=f"{task}: {k}")
            changed += not torch.equal(v, before[k])
        assert changed > 10, f"{task}: the step should have moved the weights"


def test_ddp_world_model_step_weighs_every_valid_step_of_every_rank_equally(ddp_steps):
    """Rank 0's segments are unpadded, rank 1's mostly padding: still the single-process update on the whole batch."""
    from world_model.wm import WorldModelLoss

    wm = ddp_worker.init_world_model()
    before = {k: v.clone() for k, v in wm.state_dict().items()}
    ddp_worker.wm_step(WorldModelLoss(wm), wm, ddp_worker.wm_batch())
    ddp = torch.load(ddp_steps / "wm.pt")
    changed = 0
    for k, v in wm.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6, msg=k)
        changed += not torch.equal(v, before[k])
    assert changed > 10, "the step should have moved the weights"


def test_single_process_helpers_answer_for_one_process():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.rank() == 0
    assert distributed.is_main() and distributed.all_true(True, torch.device("cpu"))
    assert not distributed.all_true(False, torch.device("cpu"))
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.shard_bounds(6) == (0, 6)
    module = torch.nn.Linear(2, 2)
    assert distributed.wrap(module, torch.device("cpu")) is module


def test_torchrun_pretrain_writes_once_and_resumes_at_world_size_one(tmp_path, capsys):
    rd = tmp_path / "run"
    tiny = ["model.num_slots=3", "model.slot_dim=8", "model.mlp_hidden=16", "model.cnn_channels=[8,8]",
            "model.cnn_strides=[2,2]", "model.feature_dim=8", "model.head_hidden=16", "data.resolution=16",
            "data.max_objects=3", "data.eval_images=4", "train.batch_size=4", "train.log_every=2",
            "train.image_every=2", "train.eval_every=4", "train.ckpt_every=2", "train.threads=1",
            "data.pool=12"]  # steps 0-2 read the pool in order, sharded; later steps draw from all of it
    out = torchrun(["tests/audited_run.py", "pretrain", "--run-dir", str(rd), "--no-progress", *tiny, "train.steps=4"],
                   AUDIT_DIR=str(tmp_path)).stdout
    assert written_by_rank(tmp_path, 1, rd) == []  # rank 0 writes the checkpoints, config.yaml and logs for all
    assert out.count("# run directory") == 1  # rank 0 prints, rank 1 stays quiet
    assert out.count("# torchrun: 2 processes, data-parallel (this one, rank 0, prints and writes for all)") == 1
    state = RunDir(rd).load_checkpoint()
    assert state["step"] == 4 and state["world_size"] == 2 and len(state["rng"]) == 2
    rows = read_jsonl(rd / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]  # one logger: rank 0's
    assert len(list((rd / "tb").glob("events.*"))) == 1
    assert run.main(["pretrain", "--resume", "--run-dir", str(rd), "--no-progress", "train.steps=6"]) == 0
    out, err = capsys.readouterr()
    assert "note: the run stopped with 2 processes and goes on with 1: each step takes train.batch_size images, " \
        "split among them, the same images at any world size" in err and "# torchrun" not in out
    state = RunDir(rd).load_checkpoint()
    assert state["step"] == 6 and state["world_size"] == 1 and len(state["rng"]) == 1


def test_torchrun_stopped_by_ctrl_c_checkpoints_the_step_its_processes_agree_on(tmp_path):
    """Ctrl-C to torchrun (which hands it on to every process, each at a step of its own): the processes agree on a
    step, stop after it with a checkpoint of it, far from the next train.ckpt_every, and the run resumes there."""
    import signal

    rd = tmp_path / "run"
    tiny = ["model.num_slots=3", "model.slot_dim=8", "model.mlp_hidden=16", "model.cnn_channels=[8,8]",
            "model.cnn_strides=[2,2]", "model.feature_dim=8", "model.head_hidden=16", "data.resolution=16",
            "data.max_objects=3", "data.eval_images=4", "train.batch_size=4", "train.log_every=1",
            "train.image_every=1000", "train.eval_every=0", "train.ckpt_every=100000", "train.threads=1"]
    err = signalled_torchrun(["run.py", "pretrain", "--run-dir", str(rd), "--no-progress", *tiny, "train.steps=100000"],
                             "step 3/", signal.SIGINT)
    assert err.count("Ctrl-C: stopping after the step all processes agree on, with a checkpoint") == 1, err[-3000:]
    state = RunDir(rd).load_checkpoint()
    assert 3 <= state["step"] < 100000 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert "interrupted; `torchrun" in err and "--resume" in err
    assert run.main(["pretrain", "--resume", "--run-dir", str(rd), "--no-progress",
                     f"train.steps={state['step'] + 1}"]) == 0
    assert RunDir(rd).load_checkpoint()["step"] == state["step"] + 1


def test_torchrun_agent_stopped_by_sigterm_checkpoints_the_agreed_step_with_every_ranks_replay(tmp_path):
    """The agent loop under torchrun, SIGTERM to torchrun: a checkpoint of the agreed env step, far from the next
    train.ckpt_every, naming both ranks' replay files, and a resume in one process goes on from it."""
    import signal

    rd = tmp_path / "run"
    err = signalled_torchrun(["run.py", "train", "--run-dir", str(rd), *AGENT, "train.ckpt_every=100000",
                              "train.env_steps=100000", "train.eval_every=0", "env.asynchronous=true"],
                             "env step 160/", signal.SIGTERM)  # torchrun signals each rank's process group
    assert err.count("SIGTERM: stopping after the step all processes agree on, with a checkpoint") == 1, err[-3000:]
    state = RunDir(rd).load_checkpoint()
    steps = state["counters"]["env_steps"]
    assert 160 <= steps < 100000 and len(state["replays"]) == 2
    assert state["counters"]["env_restarts"] == 0  # its env workers left the signal to it: none died under a step
    assert sorted(p.name for p in (rd / "replay").iterdir()) == _replay_files(rd, state)
    assert run.main(["train", "--resume", str(rd), "--no-progress", f"train.env_steps={steps + 40}"]) == 0
    assert RunDir(rd).load_checkpoint()["counters"]["env_steps"] == steps + 40


def test_torchrun_needs_a_run_dir_and_a_parallel_command(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert run.main(["pretrain", "--no-progress"]) == 2
    assert "--run-dir" in capsys.readouterr().err
    assert run.main(["train", "--no-progress"]) == 2
    assert "--run-dir" in capsys.readouterr().err
    assert run.main(["train-wm", "--data", "nowhere"]) == 2
    assert "one process" in capsys.readouterr().err


AGENT = ["--config", "configs/tiny.yaml", "--no-progress", "env.asynchronous=false", "train.prefill=120",
         "train.log_every=40", "train.ckpt_every=120", "train.eval_episodes=1", "env.max_episode_steps=60",
         "train.train_ratio=2"]


def _replay_files(rd: Path, state: dict) -> list[str]:
    """The replay files a checkpoint needs: its state files and the chunk files they name."""
    names = []
    for n in state["replays"]:
        with np.load(rd / n) as f:
            names += [Path(n).name, *(c[2] for c in json.loads(str(f["meta"]))["chunks"])]
    return sorted(names)


def test_torchrun_agent_shards_envs_and_replay_and_resumes_at_world_size_one(tmp_path, capsys):
    rd = tmp_path / "run"
    out = torchrun(["tests/audited_run.py", "train", "--run-dir", str(rd), *AGENT, "train.env_steps=240"],
                   AUDIT_DIR=str(tmp_path)).stdout
    written = written_by_rank(tmp_path, 1, rd)  # its replay shard, and its in-process env's episode records
    assert written and all(p.startswith("replay/") and "rank1" in p or p == "stats.jsonl" for p in written), written
    assert out.count("# run directory") == 1 and out.count("# torchrun: 2 processes") == 1
    state = RunDir(rd).load_checkpoint()
    assert state["counters"]["env_steps"] == 240 and len(state["rng"]) == 2
    updates = state["counters"]["updates"]
    assert state["replays"] == [f"replay/{240:012d}-{updates:09d}-rank{r}.npz" for r in (0, 1)]
    shards = [ReplayBuffer.load(rd / name) for name in state["replays"]]
    assert [len(s) for s in shards] == [121, 121]  # one env per rank: its first frame + 120 steps each
    assert not np.array_equal(shards[0].data["image"][:121], shards[1].data["image"][:121])  # own envs
    assert sorted(p.name for p in (rd / "replay").iterdir()) == _replay_files(rd, state)
    last = [r for r in read_jsonl(rd / "metrics.jsonl") if "loop/replay_ratio" in r]
    assert [r["step"] for r in last] == [40 * i for i in range(1, 7)]  # rank 0 logs, once per step
    cfg = load_config(AgentConfig, ROOT / "configs/tiny.yaml", AGENT[3:] + ["train.env_steps=240"])
    assert last[-1]["loop/updates"] == updates_due(240, cfg)
    assert run.main(["train", "--resume", str(rd), "--no-progress", "train.env_steps=280"]) == 0
    assert "note: the run stopped with 2 processes and goes on with 1: its replay is split among them anew" in \
        capsys.readouterr().err
    state = RunDir(rd).load_checkpoint()
    assert state["counters"]["env_steps"] == 280 and len(state["replays"]) == 1
    merged = ReplayBuffer.load(rd / state["replays"][0])
    assert sorted(p.name for p in (rd / "replay").iterdir()) == _replay_files(rd, state)  # both old shards' gone
    assert len(merged) == 242 + 2 + 40  # both shards merged, then 2 envs: a reset frame each and 40 steps


COLLECTIVES = """
import json, sys
import torch, torch.distributed as dist
from world_model import distributed
from world_model.rundir import rank_seed
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=sys.argv[2], rank=rank, world_size=2)
cpu = torch.device("cpu")
out = {"one_false": distributed.all_true(rank == 0, cpu), "all_true": distributed.all_true(True, cpu),
       "scalars": distributed.mean_scalars({"loss": 1.0 + 2 * rank, "n": 4.0 * rank}, cpu),
       "mean": distributed.mean_(torch.tensor([2.0 * rank, 6.0])).tolist(),
       "gathered": distributed.gather_objects(f"r{rank}"), "shard": list(distributed.shard_bounds(6)),
       "main": distributed.is_main(), "seed": rank_seed(7),
       "gathered_tensor": distributed.gathered(torch.tensor([rank, 10 + rank])).tolist()}
import os
from pathlib import Path
from envs.errors import UsageError
shared = Path(sys.argv[3])
out["made"] = distributed.check_shared_folder(shared / "run")  # one folder for both: passes, leaves nothing there
dist.barrier()
out["left"] = os.listdir(shared / "run")
try:
    distributed.check_shared_folder(shared / f"own{rank}")  # each rank's own: rank 1 cannot see rank 0's token
except UsageError as e:
    out["unshared"] = str(e)
from agent.actor_critic import ReturnNormalizer
norm = ReturnNormalizer()
norm.update(torch.arange(10.0).view(2, 5) + 100 * rank)  # rank 0's returns 0..9, rank 1's 100..109
out["normalizer"] = [norm.low.item(), norm.high.item()]
from world_model.config import PretrainConfig, load_config
from world_model.sources import GeneratedScenes, ScenePool
ScenePool.CHUNK = 3  # a pool of 8 in rounds of a chunk per rank: chunks 0 (rank 0) and 1 (rank 1) at step 0,
source = GeneratedScenes(load_config(PretrainConfig, None, POOL_OVERRIDES), cpu, sharded=True)  # 2 (rank 0) at 3
out["rendered"], generate = [], source.gen.generate
source.gen.generate = lambda n, seed: out["rendered"].append(seed) or generate(n, seed)
for step in range(5):  # step by step, as training asks
    source.batch(2, seed=7, step=step)
torch.save(source.pool.data, shared / f"pool{rank}.pt")
dist.barrier()
dist.destroy_process_group()
print(json.dumps(out))
"""


POOL = ["data.resolution=16", "data.max_objects=3", "data.pool=8", "train.batch_size=2"]


def test_collectives_of_two_processes(tmp_path):
    """Two gloo processes (no torchrun, a few seconds): all_true is an AND over ranks (one rank's non-finite loss
    skips the update on all), logged scalars and tensors are means (rank 0's loss 1 and rank 1's 3 log 2), objects
    come back in rank order, rank r of 2 gets items [3r, 3r + 3) of 6, only rank 0 is main, and each rank's seed
    is mixed_seed(seed, rank, 0); tensors gather in rank order, and the return normalizer takes the percentiles of
    every rank's returns, as one process on all of them would (not the mean of each rank's); a run directory that
    is not one folder for all processes (each node's own) is refused; a scene pool is rendered a chunk per rank
    and exchanged, so each rank renders its share and holds the pool one process would."""
    from world_model.rundir import mixed_seed
    from world_model.sources import POOL_STREAM, GeneratedScenes, ScenePool, stream_seed

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    init = f"file://{tmp_path / 'init'}"
    script = COLLECTIVES.replace("POOL_OVERRIDES", repr(POOL))
    procs = [subprocess.Popen([sys.executable, "-c", script, str(r), init, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-3000:]
            outs.append(json.loads(out.splitlines()[-1]))
    finally:  # a failed rank leaves the other waiting in a collective: not for gloo's 30 minutes
        for p in procs:
            p.kill()
    for r, out in enumerate(outs):
        assert out["one_false"] is False and out["all_true"] is True
        assert out["scalars"] == {"loss": 2.0, "n": 2.0} and out["mean"] == [1.0, 6.0]
        assert out["gathered"] == ["r0", "r1"] and out["shard"] == [3 * r, 3 * r + 3]
        assert out["main"] == (r == 0) and out["seed"] == mixed_seed(7, r, 0)
        assert out["gathered_tensor"] == [0, 10, 1, 11]
        assert out["made"] == (r == 0)  # rank 0 made the folder: its run removes it if it leaves it empty
        assert out["left"] == [] and out["unshared"] == (
            f"the run directory {tmp_path / f'own{r}'} is not one folder for all processes: rank 1 cannot see "
            "the file rank 0 wrote there (a folder local to each node?); under torchrun on several nodes, --run-dir "
            "must be on a file system every node shares")
        everything = torch.cat([torch.arange(10.0), torch.arange(10.0) + 100])  # the percentiles of both ranks'
        assert out["normalizer"] == pytest.approx(torch.quantile(everything, torch.tensor([0.05, 0.95])).tolist())
    assert not (tmp_path / "own0").exists()  # rank 0 made it for the check, and leaves nothing behind
    cfg = load_config(PretrainConfig, None, POOL)
    for r, chunks in enumerate(([0, 2], [1])):  # each rank rendered its share of the pool's chunks...
        assert outs[r]["rendered"] == [stream_seed(cfg.train.seed, POOL_STREAM, c) for c in chunks]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ScenePool, "CHUNK", 3)
        whole = GeneratedScenes(cfg, torch.device("cpu"))
        whole.pool.fill(8)
    for r in (0, 1):  # ...and holds the whole pool, as one process renders it
        held = torch.load(tmp_path / f"pool{r}.pt")
        for k, v in whole.pool.data.items():
            torch.testing.assert_close(held[k], v, rtol=0, atol=0)


def test_sizes_that_do_not_divide_are_refused_before_the_process_group_is_joined(monkeypatch):
    """From torchrun's environment alone (before setup): a global size that does not split over the processes is a
    one-line error; a lost peer is told apart from a process's own failure; a node's first process that is not
    rank 0 is not the main process."""
    from envs.errors import UsageError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match=r"train.batch_size=3 does not divide over the 2 processes; pick a multiple of 2"):
        distributed.check_divides(3, "train.batch_size")
    distributed.check_divides(4, "train.batch_size")
    assert distributed.lost_peer(RuntimeError("[gloo] Connection closed by peer [::1]:29500"))
    assert distributed.lost_peer(RuntimeError("NCCL error: remote process exited or there was a network error"))
    assert not distributed.lost_peer(RuntimeError("CUDA out of memory"))
    assert distributed.lost_peer(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error "
                                              "[127.0.0.1]:41234: Connection reset by peer"))
    assert not distributed.lost_peer(RuntimeError(  # this process's own env worker died
        "ResilientVectorEnv: worker 0 failed reset twice: worker process died (exit code 1, "
        "ConnectionResetError(104, 'Connection reset by peer'))"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.rank() == 2 and not distributed.is_main()
