"""Sharded training (``--ep W``): W processes train the single-process model step for step;
checkpoints move between W; a killed rank fails the others with its name; corrupt or
mismatched checkpoints are refused.

Each spawn starts W real processes (gloo, one thread each): a few seconds apiece.
"""

import datetime
import os
import shutil
import time

import pytest
import torch

from moe_lab.config import MoEConfig
from moe_lab.data import load_corpus
from moe_lab.model import ModelConfig, TinyLM
from moe_lab.parallel import SpawnError, free_port
from moe_lab.train import TrainConfig, make_optimizer, train
from moe_lab.train.checkpoint import write_checkpoint
from moe_lab.train.sharded import check_layout, load_resharded, shard_model, train_sharded

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64
TOL = 1e-12  # float64: round-off only


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_code_bytes=100_000)


def tiny_cfg(steps=6, num_experts=4, **kw) -> TrainConfig:
    # top-2 of 4 with the aux loss, z-loss and bias balancing all on: every global statistic
    moe = MoEConfig(d_model=16, d_ff=16, num_experts=num_experts, top_k=2,
                    aux_loss_coef=0.01, z_loss_coef=0.001, bias_update_rate=0.001)
    model = ModelConfig(block_size=16, d_model=16, n_layers=2, n_heads=2, d_ff=32, moe=moe)
    fields = dict(steps=steps, batch_size=8, eval_every=2, warmup=2, seed=0,
                  val_prose_windows=3, val_code_windows=6, grad_clip=0.5)
    fields.update(kw)
    return TrainConfig(model=model, **fields)


def curve(log):
    return [(e["step"], e["train_loss"], e["val_loss"]) for e in log["evals"]]


def assert_same_run(log, ref, model=None, ref_model=None, tol=TOL):
    assert [e["step"] for e in log["evals"]] == [e["step"] for e in ref["evals"]]
    for a, b in zip(log["evals"], ref["evals"], strict=True):
        for key in ("train_loss", "val_loss", "val_prose", "val_code"):
            assert abs(a[key] - b[key]) < tol, (a["step"], key, a[key], b[key])
        assert a["expert_load"] == b["expert_load"], a["step"]  # global counts, exactly
    if model is not None:
        theirs = ref_model.state_dict()
        for name, v in model.state_dict().items():
            assert (v - theirs[name]).abs().max() < tol, name


@pytest.fixture(scope="module")
def reference(corpus):
    """The single-process run, float64."""
    return train(tiny_cfg(), corpus=corpus, progress=False, dtype=F64)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("W", [1, 2, 4])
def test_sharded_run_equals_one_process(W, corpus, reference):
    ref_model, ref = reference
    model, log = train_sharded(tiny_cfg(), W, corpus=corpus, dtype=F64, deadline_s=150)
    assert_same_run(log, ref, model, ref_model)
    assert log["ep"]["world_size"] == W
    assert log["ep"]["experts_per_rank"] == [[r * 4 // W, (r + 1) * 4 // W] for r in range(W)]
    sent = torch.tensor(log["ep_send_rows"])  # (steps, W senders, layers, W receivers)
    assert sent.shape == (6, W, 2, W)
    # every row a rank sends is one kept assignment: the global batch's tokens times top-k
    assert (sent.sum(dim=(1, 3)) == 8 * 16 * 2).all()


@pytest.mark.timeout(240)
def test_checkpoint_moves_between_expert_parallel_sizes(corpus, reference, tmp_path):
    """Save at W=2 mid-run; the file is the single-process checkpoint (optimizer state
    included); resuming it at W=1 and at W=4 continues exactly as the unbroken run."""
    ref_model, ref = reference
    cfg = tiny_cfg()
    at2, at1 = tmp_path / "ep2", tmp_path / "one"
    train_sharded(cfg, 2, out=at2, stop_at=3, corpus=corpus, dtype=F64, deadline_s=150)
    train(cfg, out=at1, stop_at=3, corpus=corpus, progress=False, dtype=F64)
    sharded = torch.load(at2 / "ckpt.pt", weights_only=True)
    single = torch.load(at1 / "ckpt.pt", weights_only=True)
    assert sharded["step"] == single["step"] == 3
    assert sharded["model"].keys() == single["model"].keys()
    for name, v in single["model"].items():
        assert sharded["model"][name].shape == v.shape
        assert (sharded["model"][name] - v).abs().max() < TOL, name
    assert sharded["optim"]["param_groups"] == single["optim"]["param_groups"]
    for idx, st in single["optim"]["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert (sharded["optim"]["state"][idx][key] - st[key]).abs().max() < TOL, (idx, key)

    for W in (1, 4):
        folder = tmp_path / f"resume{W}"
        shutil.copytree(at2, folder)
        if W == 1:  # the plain single-process trainer reads the sharded run's file
            model, log = train(cfg, out=folder, resume=True, corpus=corpus, progress=False,
                               dtype=F64)
        else:
            model, log = train_sharded(cfg, W, out=folder, resume=True, corpus=corpus,
                                       dtype=F64, deadline_s=150)
            assert log["resharded"] == [{"step": 3, "from": 2, "to": 4}]
        assert_same_run(log, ref, model, ref_model)


@pytest.mark.timeout(180)
def test_killed_rank_fails_the_others_and_resume_continues(corpus, reference, tmp_path):
    ref_model, ref = reference
    cfg = tiny_cfg(ckpt_every=2)
    timeout_s = 20.0
    start = time.monotonic()
    with pytest.raises(SpawnError) as info:
        train_sharded(cfg, 2, out=tmp_path, corpus=corpus, dtype=F64, timeout_s=timeout_s,
                      kill_at=(1, 5), deadline_s=150)
    took = time.monotonic() - start
    msg = str(info.value)
    assert "rank 1 died without a result" in msg
    assert "rank 0:" in msg and "lost rank 1 (process" in msg and "exited" in msg, msg
    assert "PeerFailure" in msg
    assert took < timeout_s + 15  # a dead peer's sockets close: no need to wait the timeout
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4  # the last one
    model, log = train_sharded(cfg, 2, out=tmp_path, resume=True, corpus=corpus, dtype=F64,
                               deadline_s=150)
    assert_same_run(log, ref, model, ref_model)


# ---------------------------------------------------------------- in one process


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded(cfg):
    torch.manual_seed(cfg.seed)
    model = shard_model(TinyLM(cfg.model))
    return model, make_optimizer(model, cfg)


def test_bad_checkpoints_are_refused_naming_the_mismatch(corpus, tmp_path, one_rank_group):
    cfg = tiny_cfg(steps=2)
    train(cfg, out=tmp_path, corpus=corpus, progress=False)
    ckpt = tmp_path / "ckpt.pt"
    model, opt = _sharded(cfg)
    assert load_resharded(ckpt, model, opt, cfg)[0] == 2
    other = tiny_cfg(steps=2, num_experts=8)
    with pytest.raises(ValueError, match=r"num_experts: 4 in checkpoint, 8 now"):
        load_resharded(ckpt, *_sharded(other), other)
    blob = torch.load(ckpt, weights_only=True)
    blob["model"]["blocks.1.ffn.experts.w_up"] = torch.zeros(4, 16, 15)
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.experts\.w_up: \(4, 16, 15\) in "
                                         r"checkpoint, \(4, 16, 16\) in model"):
        load_resharded(tmp_path / "bad.pt", model, opt, cfg)
    (tmp_path / "cut.pt").write_bytes(ckpt.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match=r"cut\.pt is not a readable checkpoint"):
        load_resharded(tmp_path / "cut.pt", model, opt, cfg)
    with pytest.raises(ValueError, match=r"--ep 3 must divide the number of experts \(4\)"):
        check_layout(cfg, 3)
    with pytest.raises(ValueError, match=r"--ep 4 must divide the batch size \(6\)"):
        check_layout(tiny_cfg(batch_size=6), 4)


def test_a_failed_write_leaves_the_previous_checkpoint_whole(corpus, tmp_path, monkeypatch):
    cfg = tiny_cfg(steps=2)
    train(cfg, out=tmp_path, corpus=corpus, progress=False)
    ckpt = tmp_path / "ckpt.pt"
    before = ckpt.read_bytes()

    def dies_mid_write(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(ckpt, cfg, 3, {}, {}, {})
    assert ckpt.read_bytes() == before


# ---------------------------------------------------------------- command line


@pytest.mark.parametrize("args, message", [
    (["--variant", "dense", "--ep", "2"], "--ep needs an MoE variant"),
    (["--variant", "moe8", "--ep", "3"], r"--ep 3 must divide the number of experts \(8\)"),
    (["--variant", "moe8", "--ep", "0"], "must be an integer >= 1"),
    (["--variant", "moe8", "--ep", "2", "--timeout-s", "0"], "must be a number > 0"),
])
def test_cli_refuses_a_bad_sharding(args, message, tmp_path, capsys):
    from moe_lab.train import main

    with pytest.raises(SystemExit) as info:
        main(["--config", "short", "--out", str(tmp_path / "run"), *args])
    assert info.value.code == 2
    import re

    assert re.search(message, capsys.readouterr().err)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_spawn_then_torchrun_resume_at_another_size(tmp_path):
    """`--ep 2` (spawned here), then torchrun at W=4 resumes and extends the run: the same
    numbers as the same two commands without --ep, to float32 round-off."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    base = ["--config", "short", "--variant", "moe8", "--threads", "1"]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    runs = {
        "ep": [[sys.executable, "-m", "moe_lab.train", *base, "--steps", "4", "--ep", "2"],
               [torchrun, "--standalone", "--nproc_per_node=4", "-m", "moe_lab.train", *base,
                "--steps", "6", "--ep", "4", "--resume"]],
        "one": [[sys.executable, "-m", "moe_lab.train", *base, "--steps", "4"],
                [sys.executable, "-m", "moe_lab.train", *base, "--steps", "6", "--resume"]],
    }
    logs = {}
    for name, cmds in runs.items():
        for cmd in cmds:
            proc = subprocess.run([*cmd, "--out", str(tmp_path / name)], cwd=root, env=env,
                                  capture_output=True, text=True, timeout=200)
            assert proc.returncode == 0, proc.stderr[-3000:]
        logs[name] = json.loads((tmp_path / name / "log.json").read_text())
    assert logs["ep"]["resharded"] == [{"step": 4, "from": 2, "to": 4}]
    assert logs["ep"]["routing_by_kind"] == logs["one"]["routing_by_kind"]
    assert_same_run(logs["ep"], logs["one"], tol=1e-5)
