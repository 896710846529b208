"""The layers and the run's pieces: imports point one way (workbench <- trainers, evals <- entry points),
the registries are handed in, and the run directory, record and pipeline pieces work on their own."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_run_config

ROOT = Path(__file__).resolve().parent.parent


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every import in a file, function-level (lazy) imports included."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("layer,forbidden", [("workbench", {"trainers", "evals", "experiment", "plot"}),
                                             ("trainers", {"evals", "experiment", "plot"})])
def test_lower_layers_never_import_upper_ones(layer, forbidden):
    files = sorted((ROOT / layer).glob("*.py"))
    assert len(files) >= 5
    bad = {f.name: sorted(imported_packages(f) & forbidden) for f in files if imported_packages(f) & forbidden}
    assert not bad, f"{layer}/ imports a layer above it: {bad}"


def test_evals_import_trainers_only_from_their_command_line():
    bad = [f.name for f in (ROOT / "evals").glob("*.py") if "trainers" in imported_packages(f) and f.name != "run.py"]
    assert not bad, bad  # evals/run.py loads a run's config.toml, so it registers the trainers like experiment.py


def test_a_known_violation_is_caught(tmp_path):
    """The walker sees lazy imports inside functions (the form the old cycle took)."""
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from trainers import make_trainer\n    import evals.core\n")
    assert imported_packages(f) == {"trainers", "evals"}


def module_graph() -> dict[str, set[str]]:
    """Project module -> project modules it imports (lazy ones included); a package's __init__ is the package."""
    files = {f: ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for pkg in ("workbench", "trainers", "evals") for f in (ROOT / pkg).glob("*.py")}
    names = set(files.values())
    graph = {}
    for f, mod in files.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                         for a in node.names}
        graph[mod] = {d for d in deps if d in names and d != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_cycle_between_project_modules():
    graph = module_graph()
    assert len(graph) >= 30 and "workbench.pipeline" in graph and "trainers.topk" in graph["trainers"]
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the finder finds one


def test_config_loader_without_registries_says_what_to_import():
    code = ("from workbench.config import load_config\n"
            "try:\n    load_config('run_configs/quickstart.toml')\n"
            "except RuntimeError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    assert "ERR" in out and "import trainers, evals" in out
    # and nothing under workbench pulled the upper layers in behind the loader's back
    code2 = "import sys, workbench.config, workbench.pipeline\nprint(sorted(m for m in sys.modules if m.split('.')[0] in ('trainers', 'evals')))"
    out2 = subprocess.run([sys.executable, "-c", code2], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out2.stdout.strip() == "[]", out2.stderr[-500:]


def test_registries_hold_every_trainer_and_eval():
    import evals
    import trainers
    from workbench.config import EVAL_CHECKS, TRAINER_CONFIGS
    assert set(TRAINER_CONFIGS) == set(trainers.TRAINERS) and "topk" in TRAINER_CONFIGS
    assert set(EVAL_CHECKS) == evals.EVALS and EVAL_CHECKS["sae_probes"] is evals.check_sae_probes


# ---------------------------------------------------------------- rundir

def test_trim_log_keeps_lines_before_the_checkpoint_and_drops_a_torn_one(tmp_path):
    from workbench.rundir import trim_log
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 10, 20, 30)) + '{"step": 4')
    trim_log(log, next_step=20)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [0, 10]
    trim_log(tmp_path / "absent.jsonl", 5)  # nothing to trim: no error, no file
    assert not (tmp_path / "absent.jsonl").exists()


def test_checkpoint_round_trip_and_unreadable_file(tmp_path):
    from workbench.config import ConfigError
    from workbench.rundir import CHECKPOINT, load_checkpoint, resumable, save_checkpoint
    state = {"w": torch.arange(5.0), "loop": {"next_step": 7}}
    save_checkpoint(tmp_path, state)
    assert resumable(tmp_path) and [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]  # no temp file left
    got = load_checkpoint(tmp_path)
    assert torch.equal(got["w"], state["w"]) and got["loop"] == {"next_step": 7}
    (tmp_path / "final_info.json").write_text("{}")
    assert not resumable(tmp_path)  # a finished run is never resumed
    (tmp_path / CHECKPOINT).write_bytes(b"torn")
    with pytest.raises(ConfigError, match="unreadable checkpoint.pt.*--overwrite"):
        load_checkpoint(tmp_path)


def test_old_format_checkpoint_fails_with_one_line_naming_the_fix(tmp_path, capsys):
    """A checkpoint written before the pydantic config and the sae_lens SAE classes (format 1) is refused
    before anything loads: exit 2, one line naming --overwrite, the run directory left as it was."""
    import experiment
    from workbench.rundir import CHECKPOINT
    torch.save({"version": 1, "loop": {"next_step": 7}}, tmp_path / CHECKPOINT)
    before = (tmp_path / CHECKPOINT).read_bytes()
    assert experiment.main([f"--out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "format 1" in err[0] and "--overwrite" in err[0], err
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT] and (tmp_path / CHECKPOINT).read_bytes() == before


def test_check_out_dir_and_mark_failed(tmp_path):
    from workbench.config import ConfigError
    from workbench.rundir import check_out_dir, mark_failed
    check_out_dir(tmp_path / "new", overwrite=False)  # absent: fine
    (tmp_path / "run_1").mkdir()
    (tmp_path / "run_1" / "final_info.json").write_text("{}")
    with pytest.raises(ConfigError, match="already holds a finished run"):
        check_out_dir(tmp_path / "run_1", overwrite=False)
    check_out_dir(tmp_path / "run_1", overwrite=True)
    with pytest.raises(ConfigError, match="parent .* does not exist"):
        check_out_dir(tmp_path / "no" / "run", overwrite=False)
    (tmp_path / "run_2").mkdir()
    mark_failed([tmp_path / "run_1", tmp_path / "run_2", tmp_path / "never_made"], "disk full")
    assert not (tmp_path / "run_1" / "failed.txt").exists()  # finished runs are left alone
    assert (tmp_path / "run_2" / "failed.txt").read_text() == "disk full\n"
    assert not (tmp_path / "never_made").exists()


# ---------------------------------------------------------------- pipeline, from a cache entry (no LM)

def test_pipeline_runs_from_a_cached_stream_with_the_pieces_handed_in(tmp_path, monkeypatch):
    """The whole pipeline without an LM: the stream is a cache entry written under the run's key; the
    trainer factory is the real one, the evaluator a stub that records what it was given."""
    import trainers
    from workbench.cache import ActivationCache, cache_key
    from workbench.pipeline import run
    from workbench.stream import stream_description, stream_tokens

    import workbench.cpu_kernels
    from workbench.config import load_config
    from workbench.lm import resolve_auto_dtypes

    cfg = tiny_run_config()
    cfg.cache.dir, cfg.log.progress, cfg.data.norm_tokens = str(tmp_path / "cache"), False, 256
    cfg.data.prefetch_chunks = 0
    cfg.eval.types = ["core"]
    # dtype = auto on an AVX2 CPU (no bf16 instructions) is float32, in the stream's key and the run's record
    cfg.model.dtype = cfg.sae.compute_dtype = "auto"
    monkeypatch.setattr(workbench.cpu_kernels, "cpu_flags", lambda: "flags\t\t: fpu sse2 avx avx2 fma")
    n, d = stream_tokens(cfg), 16
    g = torch.Generator().manual_seed(0)
    key = cache_key(stream_description(resolve_auto_dtypes(cfg, torch.device("cpu")), torch.device("cpu")))
    writer = ActivationCache(cfg.cache.dir).writer(key, n, {}, torch.float32)
    writer.finish(iter([torch.randn(200, d, generator=g) * 30 for _ in range(-(-n // 200))]))
    seen = {}

    class FakeLM:
        tokenizer = None

    def evaluate(cfg_, model, saes, artifacts, phases):
        seen.update(n_saes=len(saes), d_in=saes[0].d_in, artifacts=artifacts)
        return [{"core evaluation results": {"metrics": {"x": 1.0}}}], {"absorption": "not asked"}

    import workbench.stream as ws
    monkeypatch.setattr(ws.LazyLM, "get", lambda self: FakeLM())  # only the evaluator asks for a model
    out_dir = tmp_path / "run_1"
    [(run_dir, final)] = run(cfg, out_dir, False, ["--out_dir=run_1"], make_trainer=trainers.make_trainer,
                             evaluate=evaluate)
    assert run_dir == out_dir and seen == {"n_saes": 1, "d_in": d, "artifacts": out_dir / "eval_artifacts"}
    assert {p.name for p in out_dir.iterdir()} == {"config.toml", "train_log.jsonl", "sae", "final_info.json"}
    assert json.loads((out_dir / "final_info.json").read_text()) == json.loads(json.dumps(final))
    tr = final["training results for layer 1"]
    assert tr["provenance"]["activation_source"].startswith("cache:") and tr["final_info"]["training_steps"] == cfg.total_steps
    assert final["core evaluation results"] == {"metrics": {"x": 1.0}} and final["skipped evaluations"] == {"absorption": "not asked"}
    assert tr["config"]["activation_dim"] == d and tr["provenance"]["command"] == "python experiment.py --out_dir=run_1"
    assert (tr["provenance"]["llm_dtype"], tr["provenance"]["sae_compute_dtype"]) == ("float32", "float32")
    assert tr["provenance"]["dtype_auto"] == ("model.dtype and sae.compute_dtype = auto -> float32 (this CPU has no "
                                              "bf16 matmul instructions (amx_bf16, avx512_bf16, Arm bf16))")
    written = load_config(out_dir / "config.toml")  # what auto chose, so the file reproduces the run
    assert (written.model.dtype, written.sae.compute_dtype) == ("float32", "float32")


# ---------------------------------------------------------------- record

def test_null_sae_absorption_is_recorded_beside_every_other_run(tmp_path):
    import trainers
    from workbench.record import NULL_CONTROL_KEY, absorption_null_control, final_info

    mean = {"mean_absorption_fraction_score": 0.41, "mean_full_absorption_score": 0.5, "mean_num_split_features": 1.2}
    results = [{"absorption evaluation results": {"eval_result_metrics": {"mean": {"mean_absorption_fraction_score": 0.6}}}},
               {"absorption evaluation results": {"eval_result_metrics": {"mean": mean}}}]
    control = absorption_null_control([tmp_path / "run_1", tmp_path / "run_1_null"], ["topk", "null"], results)
    assert control == {"run": "run_1_null", **mean}
    assert absorption_null_control([tmp_path / "run_1"], ["topk"], results[:1]) is None  # no null on the stream
    stats = {"steps": 1, "final_loss": [1.0, 2.0], "final_l0": [4.0, 4.0], "trainer_step_s": [0.1, 0.1]}
    finals = []
    for i, name in enumerate(["topk", "null"]):
        cfg = tiny_run_config(name=name, k=4)
        tr = trainers.make_trainer(cfg.trainer, d_in=16, d_sae=64, total_steps=1, total_tokens=32,
                                   init_acts_BD=torch.randn(8, 16), seed=0)
        finals.append(final_info(cfg, tr, i, stats, results[i], {}, {"device": "cpu"}, control))
    assert finals[0][NULL_CONTROL_KEY] == control and NULL_CONTROL_KEY not in finals[1]
    assert finals[0]["absorption evaluation results"] == results[0]["absorption evaluation results"]  # SAEBench's, unchanged
    assert 0 < finals[0]["training results for layer 1"]["final_info"]["mean_max_decoder_cosine"] < 1
