"""Decisions made once for all processes, and checkpoint saves that several nodes' main processes may share
(--save_on_each_node on a shared filesystem)."""

import os

import torch
import torch.multiprocessing as mp

from llava.training.checkpoints import COMPLETE_MARKER, is_complete, mark_complete, remove_checkpoint
from llava.training.distributed import decided_by_main_process


def _decide_per_rank(rank, port, results):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        results[rank] = decided_by_main_process(lambda: f"checkpoint seen by rank {rank}")
        try:
            decided_by_main_process(lambda: 1 / (1 - rank))  # fails on rank 1 only: not asked there
            results[f"error{rank}"] = None
        except ZeroDivisionError:
            results[f"error{rank}"] = "ZeroDivisionError"
        try:
            decided_by_main_process(lambda: 1 / rank)  # fails on rank 0: every rank raises
        except ZeroDivisionError:
            results[f"raised{rank}"] = True
    finally:
        torch.distributed.destroy_process_group()


def test_every_process_gets_rank_0s_decision_and_its_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_decide_per_rank, args=(port, results), nprocs=2, join=True)
    assert results[0] == results[1] == "checkpoint seen by rank 0"
    assert results["error0"] is None and results["error1"] is None
    assert results["raised0"] and results["raised1"]


def test_marker_ignores_another_nodes_temporary_marker(tmp_path):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    other = folder / f"{COMPLETE_MARKER}.othernode.123.tmp"
    other.write_text("{}")
    mark_complete(str(folder), 2)
    other.unlink()  # the other node renames its temporary marker into place
    assert is_complete(str(folder))


def test_removing_a_checkpoint_another_node_removed_first(tmp_path):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    remove_checkpoint(str(folder / "gone"))
    remove_checkpoint(str(folder))
    assert not os.path.exists(folder)
