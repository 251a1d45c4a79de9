"""The trainer: seeded reproducibility, exact resume, clear checkpoint errors, schedule, CLI."""

import json
import shlex

import pytest
import torch

from moe_lab.config import MoEConfig
from moe_lab.data import load_corpus
from moe_lab.model import ModelConfig, TinyLM
from moe_lab.train import (
    PRESETS,
    VARIANTS,
    TrainConfig,
    lr_at,
    main,
    make_config,
    routing_by_kind,
    train,
    variant_moe,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_code_bytes=100_000)


def tiny_cfg(steps=6, seed=0, d_model=16) -> TrainConfig:
    moe = MoEConfig(d_model=d_model, d_ff=16, num_experts=4, top_k=2)
    model = ModelConfig(block_size=16, d_model=d_model, n_layers=2, n_heads=2, d_ff=32, moe=moe)
    return TrainConfig(
        model=model, steps=steps, batch_size=4, eval_every=2, warmup=2, seed=seed,
        val_prose_windows=3, val_code_windows=5,
    )


def losses(log):
    return [(e["step"], e["train_loss"], e["val_loss"], e["expert_load"]) for e in log["evals"]]


def test_same_seed_same_losses(corpus):
    _, a = train(tiny_cfg(), corpus=corpus, progress=False)
    _, b = train(tiny_cfg(), corpus=corpus, progress=False)
    _, c = train(tiny_cfg(seed=1), corpus=corpus, progress=False)
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)
    assert [e["step"] for e in a["evals"]] == [2, 4, 6]
    assert all(abs(sum(row) - 1) < 1e-6 for e in a["evals"] for row in e["expert_load"])


def test_resume_continues_exactly(corpus, tmp_path):
    cfg = tiny_cfg(steps=6)
    straight, log = train(cfg, corpus=corpus, progress=False)
    train(cfg, out=tmp_path, stop_at=3, corpus=corpus, progress=False)  # stops mid-interval
    resumed, log2 = train(cfg, out=tmp_path, resume=True, corpus=corpus, progress=False)
    assert losses(log2) == losses(log)
    theirs = resumed.state_dict()
    for name, a in straight.state_dict().items():
        assert torch.equal(a, theirs[name]), name
    saved = json.loads((tmp_path / "log.json").read_text())
    assert losses(saved) == losses(log)


def test_bad_checkpoints_give_clear_errors(corpus, tmp_path):
    cfg = tiny_cfg(steps=2)
    with pytest.raises(FileNotFoundError, match="ckpt.pt"):
        train(cfg, out=tmp_path, resume=True, corpus=corpus, progress=False)
    train(cfg, out=tmp_path, corpus=corpus, progress=False)
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(ValueError, match=r"ckpt\.pt.*d_model: 16 in checkpoint, 8 now"):
        train(tiny_cfg(steps=2, d_model=8), out=tmp_path, resume=True, corpus=corpus)
    with pytest.raises(ValueError, match=r"ckpt\.pt.*seed: 0 in checkpoint, 1 now"):
        train(tiny_cfg(steps=2, seed=1), out=tmp_path, resume=True, corpus=corpus)
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # truncated
    with pytest.raises(ValueError, match=r"ckpt\.pt is not a readable checkpoint"):
        train(cfg, out=tmp_path, resume=True, corpus=corpus, progress=False)
    torch.save({"format": "something else"}, ckpt)
    with pytest.raises(ValueError, match="is not a moe_lab.tinylm/1 checkpoint"):
        train(cfg, out=tmp_path, resume=True, corpus=corpus, progress=False)


def test_schedule():
    cfg = make_config("short", "dense")
    assert lr_at(cfg, 0) == pytest.approx(cfg.lr / cfg.warmup)
    assert lr_at(cfg, cfg.warmup) == pytest.approx(cfg.lr)
    assert lr_at(cfg, cfg.steps) == pytest.approx(cfg.lr * cfg.min_lr_frac)


def test_variants_keep_active_ffn_size():
    for variant in ("moe8", "fine", "fine32", "top1", "nobal", "moe16", "fine32k4"):
        moe = variant_moe(variant, 64, 256)
        assert moe.d_ff * moe.top_k == 256
        total = 8 if variant in ("moe16", "fine32k4") else 4
        assert moe.d_ff * moe.num_experts == total * 256
    assert variant_moe("nobal", 64, 256).aux_loss_coef == 0
    # Top-1 gates with the raw probability; renormalised it would be 1 and the router untrained.
    assert variant_moe("top1", 64, 256).normalize_weights is False
    with pytest.raises(ValueError, match="variant"):
        variant_moe("huge", 64, 256)
    with pytest.raises(ValueError, match="config"):
        make_config("medium", "dense")
    with pytest.raises(ValueError, match="steps"):
        make_config("short", "dense", steps=0)


def test_cli_writes_log(tmp_path):
    log = main(["--config", "short", "--variant", "top1", "--steps", "3", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "log.json").read_text())
    assert saved["variant"] == "top1" and saved["evals"][-1]["step"] == 3
    assert saved["command"].startswith("python -m moe_lab.train --config short")
    assert log["params_total"] > log["params_active"]
    assert (tmp_path / "ckpt.pt").is_file()


def test_routing_by_kind_counts_every_assignment(corpus):
    cfg = tiny_cfg(steps=2)
    model, _ = train(cfg, corpus=corpus, progress=False)
    counts = routing_by_kind(model, corpus, cfg)
    assert counts.shape == (2, 2, 4)
    tokens = (3 + 5) * cfg.model.block_size  # the fixed validation set: 3 prose, 5 code windows
    assert counts.sum(dim=(1, 2)).tolist() == [tokens * 2] * 2  # k=2 assignments a token
    assert int(counts[0, 0].sum()) == 3 * cfg.model.block_size * 2


def test_validation_set_does_not_move_with_the_seed(corpus):
    """Two training seeds are scored on identical windows; the per-window log is complete."""
    from moe_lab.data import validation_windows

    a, b = tiny_cfg(seed=0), tiny_cfg(seed=7)
    wa = validation_windows(corpus, a.model.block_size, windows=a.val_windows)
    wb = validation_windows(corpus, b.model.block_size, windows=b.val_windows)
    assert all(torch.equal(u, v) for u, v in zip(wa, wb, strict=True))
    _, log = train(a, corpus=corpus, progress=False)
    last = log["evals"][-1]
    assert len(log["val_window_losses"]) == 3 + 5
    mean = sum(log["val_window_losses"]) / 8
    assert abs(mean - last["val_loss"]) < 1e-4
    assert last["val_sem"] > 0 and last["cpu_s"] > 0
    assert log["machine_start"]["torch"] == torch.__version__


def test_chapter_config_is_reproducible(corpus):
    """The chapter's own (short) config, same seed, twice: the same losses (first 50 steps)."""
    cfg = make_config("short", "moe8", seed=0)
    _, a = train(cfg, stop_at=50, corpus=corpus, progress=False)
    _, b = train(cfg, stop_at=50, corpus=corpus, progress=False)
    assert len(a["evals"]) == 1 and losses(a) == losses(b)


def test_top1_router_learns_from_the_language_model_loss():
    """With k=1 the gate must stay the raw probability, or the CE gives the router no gradient."""
    torch.manual_seed(0)
    cfg = make_config("short", "top1")
    model = TinyLM(cfg.model)
    x = torch.randint(0, 256, (2, 16))
    model(x, x).ce.backward()
    assert model.blocks[0].ffn.router.weight.grad.abs().sum() > 1e-3  # renormalised: ~1e-7


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_and_variant_has_dense_active_ffn(preset):
    """Every variant of every preset builds, with the dense model's active FFN width."""
    dense = make_config(preset, "dense").model
    for variant in VARIANTS[1:]:
        moe = make_config(preset, variant).model.moe
        assert moe.d_model == dense.d_model
        assert moe.d_ff * moe.top_k + moe.shared_d_ff == dense.d_ff


def test_training_applies_bias_balancing_when_asked(corpus):
    """bias_update_rate > 0 makes the training loop update every layer's expert_bias."""
    from dataclasses import replace

    cfg = tiny_cfg(steps=4)
    model, _ = train(cfg, corpus=corpus, progress=False)
    assert all(not b.ffn.expert_bias.any() for b in model.blocks)
    moe = replace(cfg.model.moe, bias_update_rate=0.01)
    cfg = replace(cfg, model=replace(cfg.model, moe=moe))
    model, _ = train(cfg, corpus=corpus, progress=False)
    assert all(b.ffn.expert_bias.abs().sum() > 0 for b in model.blocks)


def test_make_optimizer_groups_every_parameter_once():
    """Matrices decay; norms and embeddings' 1-D parameters do not; routers (noise excluded)
    get lr * router_lr_scale and no decay."""
    from dataclasses import replace

    from moe_lab.train import make_optimizer

    cfg = tiny_cfg()
    noisy = replace(cfg.model.moe, noisy_gating=True)
    cfg = replace(cfg, model=replace(cfg.model, moe=noisy), router_lr_scale=0.1,
                  weight_decay=0.05)
    model = TinyLM(cfg.model)
    opt = make_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values())  # each exactly once
    by_group = {(g["weight_decay"], g["lr_scale"]): [names[id(p)] for p in g["params"]]
                for g in opt.param_groups}
    routers = by_group[(0.0, 0.1)]
    assert routers and all(n.endswith("router.weight") for n in routers)
    assert len(routers) == cfg.model.n_layers
    decay = by_group[(0.05, 1.0)]
    assert any(n.endswith("router.noise.weight") for n in decay)
    assert all(p.dim() >= 2 for n, p in model.named_parameters() if n in decay)
    assert all(p.dim() < 2 for n, p in model.named_parameters() if n in by_group[(0.0, 1.0)])


# ---------------------------------------------------------------- the command line, as a user
# meets it: every bad argument is an argparse error (status 2, one "error:" line, no traceback)
# before any training; a run's folder is never overwritten by accident; --resume extends a run.

TINY = ["--config", "short", "--steps", "2", "--threads", "1"]  # one evaluation, ~1 s


def cli_error(argv, capsys) -> str:
    """Run the command line, expecting an argparse error; returns its error line."""
    capsys.readouterr()  # drop what earlier runs printed (progress bars)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    usage, line = err.strip().splitlines()
    assert usage.startswith("usage: python -m moe_lab.train ")
    assert line.startswith("python -m moe_lab.train: error: ")
    return line


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
    (["--steps", "-5"], "argument --steps: must be an integer >= 1, got -5"),
    (["--steps", "ten"], "argument --steps: expected an integer, got 'ten'"),
    (["--threads", "-1"], "argument --threads: must be an integer >= 1, got -1"),
    (["--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    (["--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    (["--config", "medium"], "argument --config: invalid choice: 'medium'"),
    (["--variant", "huge"], "argument --variant: invalid choice: 'huge'"),
    (["--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    (["--resume"], "--resume: no checkpoint to resume from"),
])
def test_cli_refuses_bad_arguments(args, message, tmp_path, capsys):
    assert message in cli_error([*args, "--out", str(tmp_path / "run")], capsys)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cli_refuses_a_file_as_out(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert f"--out {f} is a file; it must name a folder" in cli_error(["--out", str(f)], capsys)
    assert "must name a folder" in cli_error(["--out", ""], capsys)
    assert f.read_text() == "mine"


def test_cli_error_from_a_shell_is_two_lines_and_status_2(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "moe_lab.train", "--steps", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("usage: python -m moe_lab.train")
    assert lines[1] == ("python -m moe_lab.train: error: "
                        "argument --steps: must be an integer >= 1, got 0")


def test_cli_never_overwrites_a_run_by_accident(tmp_path, capsys):
    out = tmp_path / "run"
    main([*TINY, "--variant", "dense", "--out", str(out)])
    before = {n: (out / n).read_bytes() for n in ("log.json", "ckpt.pt")}
    # a second run into the same folder, even of another variant, is refused ...
    line = cli_error([*TINY, "--variant", "moe8", "--out", str(out)], capsys)
    assert "already holds a run (log.json and ckpt.pt)" in line
    assert "--resume" in line and "--overwrite" in line
    # ... and so is resuming it as another variant
    line = cli_error([*TINY, "--variant", "moe8", "--resume", "--out", str(out)], capsys)
    assert "holds a run of --config short --variant dense --seed 0" in line
    assert "asks for --config short --variant moe8 --seed 0" in line
    line = cli_error([*TINY, "--seed", "3", "--resume", "--out", str(out)], capsys)
    assert "--variant dense --seed 0; this command asks for" in line
    assert {n: (out / n).read_bytes() for n in before} == before  # untouched
    # --overwrite replaces it
    log = main([*TINY, "--variant", "moe8", "--overwrite", "--out", str(out)])
    saved = json.loads((out / "log.json").read_text())
    assert saved["variant"] == log["variant"] == "moe8" and saved["config"]["model"]["moe"]
    assert "--overwrite" in saved["command"]


def test_cli_resume_extends_a_finished_run(tmp_path, capsys):
    from moe_lab.train import config_from_argv

    out, straight = tmp_path / "run", tmp_path / "straight"
    main([*TINY, "--out", str(out)])
    # resuming needs the run's own step count, or an explicit longer one
    line = cli_error(["--config", "short", "--resume", "--out", str(out)], capsys)
    assert "is set for 2 steps, the preset for 200; pass --steps 2" in line
    line = cli_error([*TINY[:2], "--steps", "1", "--resume", "--out", str(out)], capsys)
    assert "has trained 2 steps already; to extend it, pass --steps > 2" in line
    argv = ["--config", "short", "--steps", "4", "--threads", "1", "--resume", "--out", str(out)]
    log = main(argv)
    assert [e["step"] for e in log["evals"]] == [2, 4]
    (r,) = log["resumed"]
    assert (r["step"], r["old_steps"], r["new_steps"]) == (2, 2, 4)
    assert log["config"]["steps"] == 4 and log["command"].endswith("--resume --out " + str(out))
    cfg, _ = config_from_argv(shlex.split(log["command"])[3:])
    assert cfg.to_dict() == log["config"]  # the recorded command rebuilds the recorded config
    # Inside the warm-up the schedule does not depend on the total, so the extended run is the
    # 4-step run exactly; a plain run records no resume.
    assert r["old_lr"] == r["new_lr"]
    ref = main(["--config", "short", "--steps", "4", "--threads", "1", "--out", str(straight)])
    assert "resumed" not in ref
    assert log["evals"][-1]["val_loss"] == ref["evals"][-1]["val_loss"]
    assert log["val_window_losses"] == ref["val_window_losses"]


def test_resume_with_more_steps_records_the_schedule_change(corpus, tmp_path):
    short, longer = tiny_cfg(steps=4), tiny_cfg(steps=8)
    train(short, out=tmp_path, corpus=corpus, progress=False)
    _, again = train(short, out=tmp_path, resume=True, corpus=corpus, progress=False)
    assert "resumed" not in again  # a finished run resumed as it was: nothing changes
    _, log = train(longer, out=tmp_path, resume=True, corpus=corpus, progress=False)
    assert log["resumed"] == [{"step": 4, "old_steps": 4, "new_steps": 8,
                               "old_lr": lr_at(short, 4), "new_lr": lr_at(longer, 4)}]
    assert lr_at(longer, 4) > lr_at(short, 4) == pytest.approx(short.lr * short.min_lr_frac)
    assert [e["step"] for e in log["evals"]] == [2, 4, 6, 8]
    assert log["config"] == longer.to_dict() and len(log["val_window_losses"]) == 8
    with pytest.raises(ValueError, match="has trained 8 steps already.*got 6"):
        train(tiny_cfg(steps=6), out=tmp_path, resume=True, corpus=corpus, progress=False)
