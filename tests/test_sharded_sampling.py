"""Sampling sharded by seed over 2 CPU processes (gloo) gives exactly the one-process image set."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from amedlab.evaluation.distributed import generate_sharded
from amedlab.models.analytic import default_mixture
from amedlab.schedules import make_sigmas
from amedlab.solvers import make_solver

SEEDS = list(range(11))  # not a multiple of the process count


def _worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        images, nfe = generate_sharded(default_mixture().float(), make_solver("ipndm"), make_sigmas("polynomial", 6), SEEDS, batch_size=3)
        if rank == 0:
            torch.save({"images": images, "nfe": nfe}, out_path)
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_one_process_images(tmp_path):
    single, nfe = generate_sharded(default_mixture().float(), make_solver("ipndm"), make_sigmas("polynomial", 6), SEEDS, batch_size=4)
    port = 29500 + os.getpid() % 1000
    mp.spawn(_worker, args=(2, port, str(tmp_path / "sharded.pt")), nprocs=2, join=True)
    sharded = torch.load(tmp_path / "sharded.pt", weights_only=True)
    assert sharded["nfe"] == nfe == 5
    torch.testing.assert_close(sharded["images"], single, rtol=0, atol=1e-6)
    assert single.shape == (11, 2) and single.std() > 0.1
