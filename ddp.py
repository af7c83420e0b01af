"""
The one DDP set-up that train.py and evaluate.py share: torchrun (NCCL on GPUs, gloo on CPUs) or a
plain single process, and its clean end. The collectives the losses need (gather_with_grad,
all_reduce_sum) live with the losses in tagalign.py, the one CLIP download per node
(fetch_clip_once) with the loading there.

    rank, world, device = ddp.init_distributed(timeout_minutes=30)
    ...
    ddp.end_distributed()
"""
import datetime
import gc
import os

import torch
import torch.distributed as dist


def init_distributed(timeout_minutes=None):
    """The one DDP set-up of train.py and evaluate.py. timeout_minutes: how long a rank may wait in
    a collective for the others (None: torch's default, 10 minutes under NCCL); train.py raises it
    for a resume's re-read. torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a plain `python x.py` is
    one process. With CUDA each process takes GPU LOCAL_RANK *before* NCCL starts (else every rank's
    NCCL communicator and every `.cuda()` lands on GPU 0) and the backend is NCCL, else gloo.
    Returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count == 1:  # launchers that give each task its own GPU (e.g. SLURM --gpus-per-task=1)
            local_rank = 0
        elif local_rank >= count:
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {count} GPUs are visible; "
                               "use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=timeout_minutes) if timeout_minutes else None
        # device_id binds NCCL to this GPU (the final barrier and every collective use it,
        # no guessing from rank)
        bound = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                **bound)
    return rank, world, device


def end_distributed(finished=True):
    """The end of a torchrun process. finished: every rank got here normally, so a barrier first (no
    rank tears its connections down while another still sends); after an error there is no barrier
    (the others may never come). Then the process group is destroyed and the garbage collected now:
    DDP keeps it in reference cycles, and a gloo group freed only in interpreter teardown can abort
    the process ("terminate called without an active exception", exit -6) after the work is done."""
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()
    gc.collect()
