"""Scale-out: sft.py and opcd.py launched as two "nodes" on one machine (two torchrun agents, --nnodes 2,
c10d rendezvous on 127.0.0.1, gloo), the path a multi-node run takes, against one machine's run."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(launch, script, args):
    return [sys.executable, "-m", "torch.distributed.run", *launch, str(ROOT / script), *map(str, args)]


def two_nodes(script, args):
    """Two agents of one process each, meeting at a c10d rendezvous; both must succeed."""
    launch = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
              "--rdzv_id=mgsd-test", "--max_restarts=0"]
    nodes = [subprocess.Popen(torchrun(launch, script, args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]


def one_machine(script, args, nproc):
    launch = ["--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = torchrun(launch, script, args) if nproc > 1 else [sys.executable, str(ROOT / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_sft_on_two_nodes_trains_the_weights_of_a_single_process(tiny_model, make_data, tmp_path):
    data = make_data("train", 4, tasks=["frozenlake", "maze"], kinds=("perception", "text-planning"))
    args = ["--model", tiny_model, "--data", data, "--kinds", "perception,text-planning", "--batch-size", 8,
            "--max-steps", 2, "--lr", 1e-2]
    two_nodes("sft.py", [*args, "--out", tmp_path / "nodes", "--micro-batch-size", 1])
    one_machine("sft.py", [*args, "--out", tmp_path / "single", "--micro-batch-size", 8], nproc=1)
    log = [json.loads(x) for x in (tmp_path / "nodes" / "log.jsonl").read_text().splitlines()]
    assert [e["ddp/replica_max_abs_diff"] for e in log if "ddp/replica_max_abs_diff" in e] == [0.0]
    nodes, single = (load_file(str(tmp_path / run / "checkpoint" / "trainable.safetensors")) for run in ("nodes", "single"))
    assert nodes.keys() == single.keys() and any(w.abs().max() > 0 for n, w in nodes.items() if ".lora_B." in n)
    for n in nodes:
        torch.testing.assert_close(nodes[n], single[n], atol=1e-4, rtol=1e-3)  # lr 1e-2: 1 % of one Adam step


def test_opcd_on_two_nodes_trains_the_weights_of_two_ranks_on_one_machine(tiny_model, make_data, tmp_path):
    """Rollouts are seeded by (seed, step, rank), so a single process samples other responses than two ranks do;
    the two-node run is held against two ranks on one machine: the same weights, bit for bit."""
    args = ["--model", tiny_model, "--teacher", tiny_model, "--data", make_data("train", 4, tasks=["frozenlake", "maze"],
                                                                                  kinds=("planning",)),
            "--rollout", "hf", "--batch-size", 4, "--micro-batch-size", 2, "--max-new-tokens", 8, "--max-steps", 2,
            "--lr", 1e-4]
    two_nodes("opcd.py", [*args, "--out", tmp_path / "nodes"])
    one_machine("opcd.py", [*args, "--out", tmp_path / "machine"], nproc=2)
    nodes, machine = (torch.load(tmp_path / run / "last" / "trainer_state.pt", weights_only=False)["optimizer"]["master"]
                      for run in ("nodes", "machine"))
    start = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert len(nodes) == len(machine) and all(torch.equal(a, b) for a, b in zip(nodes, machine))
    moved = load_file(str(tmp_path / "nodes" / "last" / "model.safetensors"))
    assert any(not torch.equal(moved[k], start[k]) for k in start if k in moved)
