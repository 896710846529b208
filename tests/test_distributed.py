"""torchrun on CPU (gloo), real processes: 2 ranks splitting a global batch against 1 process taking it
whole; a rank killed mid-run and the rerun that resumes it; a sweep spread over ranks.

Tolerances. The ranks' losses are written so that their mean is the single-process loss (per-token
means; AuxK's denominator, BatchTopK's threshold, co-firing pairs and C2R's activation mass from
all-reduces), and the gradients are averaged, so the only difference from one process is the order of
float32 sums: a matmul over B rows against two over B/2 rows, summed. On synthetic data that gives
|dW| <= 1e-6 after 20 steps for every trainer checked; on the embedded model's activations over 32
steps of Adam at lr 1e-3, 2e-3 of the largest weight (Adam divides tiny gradients by their own
size, so rounding noise in near-zero gradients moves weights by up to lr per step; FVU, L0 and
loss in the log agree to 1e-4). Everything that does not split a batch is exact: the harvested
activations (the same cache entry, byte for byte), a resume, and sweep_over_ranks.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

# 32 steps of a global batch of 512 (256 per rank); bf16 LM; float32 SAE (bf16 autocast rounds each
# half-batch matmul to 8 bits of mantissa, which the comparison would then measure instead)
SETS = ["data.train_tokens=16384", "data.norm_tokens=4000", "data.buffer_batches=4", "data.llm_batch_size=8",
        "data.context_size=64", "sae.d_sae=512", "sae.batch_size=512", "sae.compute_dtype='float32'",
        "eval.types=[]", "log.every_steps=4", "log.progress=false", "log.checkpoint_every=8"]
SWEEP = """extends = "{root}/run_configs/quickstart.toml"
[trainer]
name = "topk"
k = 16
[[sweep]]
label = "mom"
name = "momentum"
base = "topk"
k = 16
lambda2 = 0.5
tau = 0.3
"""


def launch(out_dir, cfg, extra=(), ranks=2, env=None):
    """The command a user types: torchrun (or plain python for 1), relative paths, from the repo root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else [sys.executable]
    cmd += ["experiment.py", f"--out_dir={out_dir}", "--config", str(cfg)]
    cmd += [a for s in [*SETS, *extra] for a in ("--set", s)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}  # torchrun's default, for 1 process too
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=full_env, timeout=900)


def weights(run_dir):
    from safetensors.torch import load_file
    return load_file(str(run_dir / "sae" / "sae_weights.safetensors"))


def log(run_dir):
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def digests(cache_dir):
    metas = list(Path(cache_dir).glob("*/meta.json"))
    assert len(metas) == 1, metas
    return [s["digest"] for s in json.loads(metas[0].read_text())["shards"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One cold single-process sweep and one cold 2-rank sweep, each storing its own cache entry."""
    root = tmp_path_factory.mktemp("dist")
    cfg = root / "sweep.toml"
    cfg.write_text(SWEEP.format(root=ROOT))
    out = {"root": root, "cfg": cfg}
    for name, ranks in (("one", 1), ("two", 2)):
        (root / name).mkdir()
        res = launch(root / name / "run_a", cfg, [f"cache.dir='{root / name / 'cache'}'"], ranks=ranks)
        assert res.returncode == 0, res.stderr[-3000:]
        out[name] = res
    return out


def test_two_ranks_harvest_the_same_activations_and_train_the_same_saes(runs):
    root = runs["root"]
    assert digests(root / "one" / "cache") == digests(root / "two" / "cache")  # LM split 2 ways, gathered in order
    for run in ("run_a", "run_a_mom"):  # topk, and momentum (global co-firing statistics and momentum state)
        one, two = weights(root / "one" / run), weights(root / "two" / run)
        for key in one:
            scale = one[key].abs().max()
            assert (one[key] - two[key]).abs().max() <= 2e-3 * scale, (run, key)
        log_one, log_two = log(root / "one" / run), log(root / "two" / run)
        assert [r["step"] for r in log_one] == [r["step"] for r in log_two] == [0, 4, 8, 12, 16, 20, 24, 28, 31]
        for r1, r2 in zip(log_one, log_two):
            for key in ("loss", "fvu", "l0", "dead_frac", "loss_recon", "lr"):
                assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), (run, r1["step"], key)
        if run == "run_a_mom":
            assert [r["cofiring_pairs"] for r in log_one] == [r["cofiring_pairs"] for r in log_two]


def test_only_rank_0_writes(runs):
    """Files a second writer would duplicate: the log's lines, notes.txt's, and the cache's temp dirs."""
    two = runs["root"] / "two"
    assert sorted(p.name for p in two.iterdir()) == ["cache", "notes.txt", "run_a", "run_a_mom"]
    assert len((two / "notes.txt").read_text().splitlines()) == 2
    for run in ("run_a", "run_a_mom"):
        assert sorted(p.name for p in (two / run).iterdir()) == \
            sorted(p.name for p in (runs["root"] / "one" / run).iterdir())
        assert len(log(two / run)) == 9
    assert not [p for p in (two / "cache").iterdir() if p.name.startswith(".")]
    assert runs["two"].stdout.count("done:") == 2  # rank 0's two lines, nothing from rank 1
    info = json.loads((two / "run_a" / "final_info.json").read_text())
    assert info["training results for layer 6"]["provenance"]["activation_source"].startswith("lm (stored as cache:")


def test_a_killed_rank_stops_the_job_with_one_line_and_the_rerun_resumes(runs):
    root, cfg = runs["root"], runs["cfg"]
    out = root / "two" / "run_k"
    cache = [f"cache.dir='{root / 'two' / 'cache'}'"]
    res = launch(out, cfg, cache, env={"SAE_WB_KILL_AT_STEP": "12", "SAE_WB_KILL_RANK": "1"})
    assert res.returncode != 0
    ours = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "rank 0" in ours[0] and "rerun the same torchrun command" in ours[0], res.stderr[-2000:]
    assert (out / "checkpoint.pt").is_file() and not (out / "final_info.json").exists()
    assert "rerun the same torchrun command" in (out / "failed.txt").read_text()
    assert launch(out, cfg, cache, ranks=1).returncode == 2  # a checkpoint of 2 ranks is not resumed by 1
    rerun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "experiment.py", f"--out_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert rerun.returncode == 0 and "resuming" in rerun.stderr, rerun.stderr[-2000:]
    for suffix in ("", "_mom"):  # the same weights and log as the uninterrupted 2-rank run, bit for bit
        got, ref = weights(Path(f"{out}{suffix}")), weights(root / "two" / f"run_a{suffix}")
        assert all(torch.equal(got[k], ref[k]) for k in ref)
        assert log(Path(f"{out}{suffix}")) == log(root / "two" / f"run_a{suffix}")


def test_sweep_over_ranks_trains_each_trainer_as_alone(runs):
    """Each rank steps its own trainer on the whole batch: the weights and logs of one process, exactly."""
    root = runs["root"]
    out = root / "two" / "run_s"
    res = launch(out, runs["cfg"], [f"cache.dir='{root / 'two' / 'cache'}'", "dist.sweep_over_ranks=true"])
    assert res.returncode == 0, res.stderr[-2000:]
    for suffix in ("", "_mom"):
        got, ref = weights(Path(f"{out}{suffix}")), weights(root / "one" / f"run_a{suffix}")
        assert all(torch.equal(got[k], ref[k]) for k in ref)
        strip = lambda rows: [{k: v for k, v in r.items() if k != "lr"} for r in rows]  # noqa: E731
        assert strip(log(Path(f"{out}{suffix}"))) == strip(log(root / "one" / f"run_a{suffix}"))


def test_a_world_size_that_does_not_divide_the_batch_is_refused(runs, tmp_path):
    res = launch(tmp_path / "run_x", runs["cfg"], ["sae.batch_size=511", "data.train_tokens=5110"])
    assert res.returncode != 0 and not (tmp_path / "run_x").exists()
    ours = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "'sae.batch_size'" in ours[0] and "multiple of the 2 ranks" in ours[0]


# ---------------------------------------------------------------- every trainer, in process (spawned ranks)

TRAINER_CASES = [("topk", dict(k=8)), ("momentum", dict(k=8, base="topk", lambda2=0.5, tau=0.3)),
                 ("momentum", dict()), ("progressive", dict(k=8)), ("relu", dict()), ("jumprelu", dict()),
                 ("batchtopk", dict(k=8, threshold_start_step=2)), ("matryoshka", dict(k=8, threshold_start_step=2)),
                 ("ortsae", dict(k=8, chunk_size=64)), ("c2r", dict(k=8, chunk_size=64)),
                 ("c2r", dict(k=8, chunk_size=64, base="batchtopk")), ("null", dict(k=8))]
N_STEPS, B, D, F = 20, 256, 32, 128


def synthetic_batches(seed=0):
    """Sparse codes over 64 directions plus noise: some latents fire together, some die (AuxK works)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, D, generator=g)
    return [torch.rand(B, 64, generator=g).pow(8) @ basis + 0.05 * torch.randn(B, D, generator=g)
            for _ in range(N_STEPS + 1)]


def train_case(name, kw):
    import trainers
    from workbench import distributed
    from workbench.config import TRAINER_CONFIGS
    cfg = TRAINER_CONFIGS[name](lr=1e-3, warmup_steps=0, dead_after_tokens=B, **kw)  # dead after a silent step: AuxK on
    batches = synthetic_batches()
    t = trainers.make_trainer(cfg, d_in=D, d_sae=F, total_steps=N_STEPS, total_tokens=N_STEPS * B,
                              init_acts_BD=batches[-1], seed=0, device="cpu", compute_dtype="float32")
    losses, auxk = [], []
    for b in batches[:-1]:
        out = t.step(distributed.local_rows(b))
        losses.append(float(distributed.all_mean(out.loss.detach())))
        auxk.append(float(distributed.all_mean(out.parts["auxk"].detach())) if "auxk" in out.parts else 0.0)
    return {k: v.clone() for k, v in t.sae.state_dict().items()}, losses, t.tokens_since_fired_F.clone(), auxk


def _rank(rank, port, queue):
    from workbench import distributed
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init("cpu", sweep_over_ranks=False)
    results = [train_case(name, kw) for name, kw in TRAINER_CASES]
    if rank == 0:  # as bytes: shared-memory tensors would vanish with this process
        import io
        buf = io.BytesIO()
        torch.save(results, buf)
        queue.put(buf.getvalue())
    distributed.shutdown()


def test_every_trainer_splits_its_batch_over_ranks_like_one_process():
    """2 gloo ranks with 128 rows each against one process with the 256-row batch, 20 steps: weights within
    1e-6 (float32 sums in another order), losses within 1e-6 relative, dead-latent counters equal."""
    import socket

    import torch.multiprocessing as mp
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs; restored below (later tests compare against subprocesses)
    try:
        alone = [train_case(name, kw) for name, kw in TRAINER_CASES]
    finally:
        torch.set_num_threads(threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    import io
    split = torch.load(io.BytesIO(queue.get(timeout=600)))
    for p in procs:
        p.join(timeout=60)
    assert max(alone[0][3]) > 0  # topk had dead latents: AuxK's global denominator (shared by its kin) was used
    for (name, kw), (w1, l1, dead1, a1), (w2, l2, dead2, a2) in zip(TRAINER_CASES, alone, split):
        for key in w1:
            assert (w1[key] - w2[key]).abs().max() <= 1e-6 * max(1.0, float(w1[key].abs().max())), (name, kw, key)
        assert l2 == pytest.approx(l1, rel=1e-6) and a2 == pytest.approx(a1, rel=1e-5, abs=1e-7), (name, kw)
        assert torch.equal(dead1, dead2), (name, kw)
