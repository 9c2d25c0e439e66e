"""main.py on 2 nodes x 1 process (two torchrun launches on this machine, gloo on CPU), then resumed on one node.

Each "node" runs in its own working directory with the same command (relative ``-l logs``), so anything node 1
wrote would appear under its own directory: the run directory, checkpoints and images must come from global
rank 0 alone.
"""
from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.training.cli import UsageError, check_node_launch

ROOT = Path(__file__).resolve().parents[1]
TINY_LDM = str(ROOT / "configs" / "tests" / "tiny_ldm.yaml")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK",
                                                             "MASTER_ADDR", "MASTER_PORT", "LDM_MAIN_LOGDIR")}
    return dict(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.slow(40)
def test_two_nodes_one_run_rank_zero_writes_lr_counts_nodes_and_resume_on_one_node(tmp_path):
    port = _free_port()
    node_dirs = [tmp_path / "node0", tmp_path / "node1"]
    procs = []
    for rank, cwd in enumerate(node_dirs):
        cwd.mkdir()
        cmd = [*TORCHRUN, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--master_addr",
               "127.0.0.1", "--master_port", str(port), str(ROOT / "main.py"), "--base", TINY_LDM, "-t",
               "--accelerator", "cpu", "--devices", "1", "--num_nodes", "2", "--max_steps", "4"]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
        time.sleep(1.1)  # the nodes start in different seconds: their own run names would differ
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240)[0])
        finally:
            proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"node {rank}:\n{out[-4000:]}"

    assert not (node_dirs[1] / "logs").exists()  # node 1 (global rank 1) wrote nothing
    (run,) = (node_dirs[0] / "logs").iterdir()  # one run directory
    # 8 training images, batch 2 per process, 2 processes: 2 steps per epoch (4 on one process)
    assert sorted(os.listdir(run / "checkpoints")) == ["epoch=000000-step=000000002.ckpt",
                                                       "epoch=000001-step=000000004.ckpt", "last.ckpt"]
    images = sorted(os.path.basename(p) for p in glob.glob(str(run / "images" / "train" / "samples_*.png")))
    assert images == ["samples_gs-000002_e-000000_b-000001.png", "samples_gs-000004_e-000001_b-000001.png"]
    last = _ckpt(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4
    # learning rate = accumulate 1 * devices 1 * nodes 2 * batch 2 * base 1e-4, logged once (rank 0) and used
    assert outputs[0].count("learning rate 4.00e-04 = 1 (accumulate_grad_batches) * 1 (devices) * 2 (num_nodes)") == 1
    assert "learning rate" not in outputs[1]
    assert last["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(4e-4)
    (saved,) = glob.glob(str(run / "configs" / "*-lightning.yaml"))
    assert OmegaConf.load(saved).lightning.trainer.num_nodes == 2

    # the saved config says num_nodes 2: without a launcher that is refused at once instead of waiting forever
    plain = [sys.executable, str(ROOT / "main.py"), "-r", str(run), "-t", "--max_steps", "6"]
    refused = subprocess.run(plain, cwd=node_dirs[0], env=_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "num_nodes=2, but this process was not started on 2 nodes" in refused.stderr
    resumed = subprocess.run([*plain, "--num_nodes", "1"], cwd=node_dirs[0], env=_env(), capture_output=True,
                             text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert [p.name for p in (node_dirs[0] / "logs").iterdir()] == [run.name]  # continued in the same run
    assert "1 (devices) * 1 (num_nodes) * 2 (batch size)" in resumed.stderr
    second = _ckpt(run / "checkpoints" / "last.ckpt")
    assert second["global_step"] == 6
    moved = [k for k, v in second["state_dict"].items() if k.startswith("model.") and not torch.equal(v, last[
        "state_dict"][k])]
    assert moved  # the resumed steps trained the model


def test_num_nodes_needs_a_multi_node_launch():
    check_node_launch(1, {})
    check_node_launch(2, {"WORLD_SIZE": "2"})  # torchrun
    check_node_launch(4, {"SLURM_NTASKS": "4"})  # srun
    check_node_launch(2, {"NODE_RANK": "1", "MASTER_ADDR": "node0"})  # Lightning's own launcher, set by hand
    with pytest.raises(UsageError, match=r"num_nodes=2, .* pass --num_nodes 1"):
        check_node_launch(2, {"OMP_NUM_THREADS": "1"})
