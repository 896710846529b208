"""Bad configs fail before any work, with one line naming the key; good ones round-trip."""
import json
import tomllib
from pathlib import Path

import pytest

import experiment
from workbench.config import ConfigError, config_to_dict, load_config, to_toml

ROOT = Path(__file__).resolve().parent.parent
QS = "run_configs/quickstart.toml"

BAD = [
    (["trainer.name=sparsemax"], "trainer.name"),
    (["trainer.kk=3"], "trainer.kk"),
    (["model.hidden=1"], "model.hidden"),
    (["nonsense=1"], "nonsense"),
    (["trainer.k=0"], "trainer.k"),
    (["trainer.k=4096"], "trainer.k"),            # k > d_sae (2048)
    (["trainer.k='many'"], "trainer.k"),
    (["trainer.lr=-1e-3"], "trainer.lr"),
    (["sae.d_sae=1.5"], "sae.d_sae"),
    (["sae.batch_size=0"], "sae.batch_size"),
    (["model.dtype='float8'"], "model.dtype"),
    (["model.device='tpu'"], "model.device"),
    (["model.hook='blocks.40.hook_resid_post'"], "model.hook"),  # the embedded model has 18 layers
    (["model.hook='resid'"], "model.hook"),
    (["data.context_size=1"], "data.context_size"),
    (["data.eval_fraction=0.9"], "data.eval_fraction"),
    (["data.train_tokens=10"], "data.train_tokens"),
    (["data.embedded_sources=['wiki','books']"], "data.embedded_sources"),
    (["eval.types=['core','absorbtion']"], "eval.types"),
    (["trainer.name='relu'"], "trainer.k"),  # the quickstart's topk key k does not fit the relu trainer
    (["log.every_steps=0"], "log.every_steps"),
    (["trainer.decay_frac=2.0"], "trainer.decay_frac"),
    (["seed='abc'"], "seed"),
    (["data.prefetch_chunks=-1"], "data.prefetch_chunks"),  # an int >= 0 or "auto"
    (["data.prefetch_chunks='soon'"], "data.prefetch_chunks"),
]


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(QS, overrides)


@pytest.mark.parametrize("overrides,key", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_cli_bad_config_exits_2_and_writes_nothing(overrides, key, tmp_path, capsys):
    out = tmp_path / "run_x"
    argv = [f"--out_dir={out}", "--config", QS] + [a for o in overrides for a in ("--set", o)]
    assert experiment.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and err[0].startswith("error:")
    assert not out.exists()


@pytest.mark.parametrize("path,overrides,key", [
    ("run_configs/quickstart_momentum.toml", ["trainer.base='gated'"], "trainer.base"),
    ("run_configs/quickstart_momentum.toml", ["trainer.beta=1.0"], "trainer.beta"),
    ("run_configs/quickstart_momentum.toml", ["trainer.lambda2=-0.1"], "trainer.lambda2"),
    ("run_configs/quickstart_progressive.toml", ["trainer.schedule='cosine'"], "trainer.schedule"),
    ("run_configs/quickstart_progressive.toml", ["trainer.base='relu'"], "trainer.base"),
    ("run_configs/quickstart_progressive.toml", ["trainer.theta0=0"], "trainer.theta0"),
    ("run_configs/quickstart_progressive.toml", ["trainer.beta=0.9"], "trainer.beta"),  # momentum's key
    ("run_configs/quickstart_c2r.toml", ["trainer.base='batchtopk'", "trainer.k=0"], "trainer.k"),
])
def test_research_trainer_keys_checked(path, overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(path, overrides)


def test_extends_merges_tables_and_rejects_cycles(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n[trainer]\nk = 8\n')
    (tmp_path / "b.toml").write_text(open(QS).read())
    cfg = load_config(tmp_path / "a.toml")
    assert cfg.trainer.k == 8 and cfg.trainer.lr == 1e-3 and cfg.model.name == "gemma-3-270m"
    (tmp_path / "c.toml").write_text('extends = "d.toml"\n')
    (tmp_path / "d.toml").write_text('extends = "c.toml"\n')
    with pytest.raises(ConfigError, match="extends itself"):
        load_config(tmp_path / "c.toml")


def test_relu_specific_value_checked():
    with pytest.raises(ConfigError, match="'trainer.l1_coeff'"):
        load_config("run_configs/quickstart_relu.toml", ["trainer.l1_coeff=-2"])


@pytest.mark.parametrize("overrides,key", [
    (["model.name='google/gemma-9-9b'", "data.dataset='embedded'"], "model.name"),
    (["data.dataset='no-such-user/no-such-dataset-xyz'"], "data.dataset"),
])
def test_preflight_rejects_before_any_model_loads(overrides, key, tmp_path, capsys, monkeypatch):
    """An unknown model or an unreachable dataset: exit 2, one line naming the key, nothing written.
    (Offline, as here and in CI, the hub look-up fails at once.)"""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    import workbench.lm
    monkeypatch.setattr(workbench.lm, "load_lm", lambda *a: pytest.fail("the model must not load"))
    out = tmp_path / "run_p"
    argv = [f"--out_dir={out}", "--config", QS] + [a for o in overrides for a in ("--set", o)]
    assert experiment.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{key}'" in err[0] and not out.exists()


def test_missing_config_file_and_finished_run(tmp_path, capsys):
    assert experiment.main([f"--out_dir={tmp_path / 'r'}", "--config", "nope.toml"]) == 2
    assert "nope.toml" in capsys.readouterr().err
    done = tmp_path / "done"
    done.mkdir()
    (done / "final_info.json").write_text("{}")
    assert experiment.main([f"--out_dir={done}", "--config", QS]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (done / "final_info.json").read_text() == "{}"


SHIPPED = sorted(str(p) for p in Path("run_configs").rglob("*.toml"))


def test_all_presets_are_shipped():
    names = {Path(p).name for p in SHIPPED}
    assert {"default.toml", "quickstart.toml", "quickstart_relu.toml", "quickstart_momentum.toml",
            "quickstart_progressive.toml", "quickstart_progressive_static.toml"} <= names
    sweep = [load_config(p).trainer for p in SHIPPED if "momentum_seed_sweep" in p]
    assert sorted((t.beta, t.tau, t.lambda2) for t in sweep) == sorted(
        [(0.9, 0.5, 0.1), (0.99, 0.3, 0.1), (0.8, 0.7, 0.5), (0.95, 0.4, 0.5), (0.95, 0.4, 0.3)])


@pytest.mark.parametrize("path", SHIPPED)
def test_presets_on_the_quickstart_setup_train_as_the_quickstart_does(path):
    """A preset on the quickstart's SAE (embedded model, 2048 latents) trains every one of its trainers with
    quickstart.toml's lr and warmup, its k where a TopK selection applies (the study's k = 16 / 64 controls
    aside) and quickstart_relu.toml's l1_coeff on a ReLU base: comparisons between presets are then about the
    method. Another trainer does not inherit a parent's [trainer] keys (config.py), and a preset that forgot
    them trained at the library defaults (k 320, Gao's lr, 1000 warmup steps)."""
    cfg = load_config(path)
    if (cfg.model.name, cfg.sae.d_sae) != ("gemma-3-270m", 2048):
        pytest.skip("not the quickstart's SAE")
    for label, t in [("[trainer]", cfg.trainer), *(cfg.sweep or [])]:
        relu_base = t.name == "relu" or getattr(t, "base", None) == "relu"
        assert (t.lr, t.warmup_steps) == (1e-3, 50), (label, t.lr, t.warmup_steps)
        if relu_base:
            assert t.l1_coeff == 0.5, label
        elif hasattr(t, "k") and not label.startswith("topk_k"):
            assert t.k == 32, (label, t.k)


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(path)
    text = to_toml(config_to_dict(cfg))
    (tmp_path / "c.toml").write_text(text)
    again = load_config(tmp_path / "c.toml")
    assert config_to_dict(again) == config_to_dict(cfg)
    assert tomllib.loads(text)["trainer"]["name"] == cfg.trainer.name


def test_default_is_the_seeds_research_setup():
    cfg = load_config(None)
    assert (cfg.model.name, cfg.model.hook, cfg.sae.d_sae, cfg.data.context_size, cfg.sae.batch_size, cfg.seed,
            cfg.trainer.name, cfg.model.dtype) == ("google/gemma-2-2b", "blocks.12.hook_resid_post", 16384, 128,
                                                   2048, 42, "topk", "bfloat16")


def test_set_parses_types():
    cfg = load_config(QS, ["trainer.k=16", "trainer.lr=3e-4", "data.embedded_sources=['wiki']", "model.dtype=float32"])
    assert cfg.trainer.k == 16 and cfg.trainer.lr == 3e-4 and cfg.data.embedded_sources == ["wiki"]
    assert cfg.model.dtype == "float32"


def test_sweep_entries_merge_and_are_validated(tmp_path):
    from workbench.config import sweep_runs
    cfg = load_config(QS, ["sweep=[{k=16}, {label='mom', name='momentum', base='topk', k=32, lambda2=0.2}]"])
    (l1, t1), (l2, t2) = cfg.sweep
    assert (l1, t1.name, t1.k, t1.lr) == ("1_topk", "topk", 16, 1e-3)  # merged over [trainer]
    assert (l2, t2.name, t2.lambda2, t2.lr) == ("mom", "momentum", 0.2, 0.0)  # another trainer: standalone
    dirs = [d.name for d, _ in sweep_runs(cfg, tmp_path / "run_3")]
    assert dirs == ["run_3", "run_3_1_topk", "run_3_mom"]
    with pytest.raises(ConfigError, match=r"sweep \(1_topk\).*'trainer.k'"):
        load_config(QS, ["sweep=[{k=99999}]"])
    with pytest.raises(ConfigError, match="label"):
        load_config(QS, ["sweep=[{label='a b'}]"])


def test_user_paths_in_every_form_resolve_once_to_absolute(tmp_path, monkeypatch):
    """cache.dir, model.cache_dir, eval.wmdp_corpus and --config: relative, absolute, ~ and spaces all end
    absolute, so nothing later depends on the working directory."""
    from workbench.config import absolute_path, load_config

    home, cwd = tmp_path / "my home", tmp_path / "work dir"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    (home / "cfg dir").mkdir()
    (home / "cfg dir" / "run.toml").write_text('extends = "%s"\n' % (ROOT / "run_configs" / "quickstart.toml"))
    forms = {"~/a cache": home / "a cache", "rel/cache": cwd / "rel" / "cache",
             str(tmp_path / "abs cache"): tmp_path / "abs cache", "../up": tmp_path / "up"}
    for given, expected in forms.items():
        for config in ("~/cfg dir/run.toml", str(home / "cfg dir" / "run.toml"), "../my home/cfg dir/run.toml"):
            cfg = load_config(config, [f"cache.dir='{given}'", f"model.cache_dir='{given}'",
                                       f"eval.wmdp_corpus='{given}/c.jsonl'"])
            assert cfg.cache.dir == str(expected) and cfg.model.cache_dir == str(expected), (given, config)
            assert cfg.eval.wmdp_corpus == str(expected / "c.jsonl")
        assert absolute_path(given) == expected
    assert load_config(ROOT / "run_configs" / "quickstart.toml").cache.dir == ""  # '' keeps its meaning


@pytest.mark.parametrize("text", ["a\nb", 'say "hi"', "back\\slash", "tab\there", "ünïcödé ✓", "bell\x07", ""])
def test_config_toml_round_trips_every_string_form(text):
    """A run's config.toml must parse back (resume and evals/run.py read it): newline, quote, backslash,
    tab, non-ASCII and control characters included."""
    cfg = load_config(QS, [f"log.wandb_project={json.dumps(text)}"] if text else ["log.wandb_project=''"])
    assert cfg.log.wandb_project == text
    back = tomllib.loads(to_toml(config_to_dict(cfg)))
    assert back["log"]["wandb_project"] == text


def test_to_toml_round_trips_every_key_type():
    """Every value type a config holds (and a trainer table) reads back equal and of the same type; None,
    which TOML cannot hold, is left out so the key's default applies."""
    tree = {"seed": 7, "name": "x", "flag": False, "tiny": 1e-12, "big": 3.0e38, "neg": -0.5, "whole": 2.0,
            "ints": [1, 2, 5], "strs": ["wiki", "c\n4"], "floats": [0.1, 1.0], "empty": [], "gone": None,
            "model": {"hook": "blocks.3.hook_resid_post", "n": 0, "on": True, "none": None},
            "trainer": {"name": "topk", "k": 32, "auxk_alpha": 0.03125}}
    back = tomllib.loads(to_toml(tree))
    want = {k: v for k, v in tree.items() if k != "gone"}
    want["model"] = {k: v for k, v in tree["model"].items() if k != "none"}
    assert back == want
    assert type(back["whole"]) is float and type(back["seed"]) is int and type(back["flag"]) is bool


def test_help_config_lists_every_key_with_its_default_and_meaning(capsys):
    """The key reference is generated from the pydantic fields: every run key and every registered
    trainer's key appears with its default and its description."""
    from workbench.config import TRAINER_CONFIGS, RunConfig, config_fields
    assert experiment.main(["--help-config"]) == 0
    text = capsys.readouterr().out
    for table, info in config_fields(RunConfig).items():
        if table in ("trainer", "sweep"):
            continue
        sub = info.default_factory
        for name, f in (config_fields(sub).items() if isinstance(sub, type) else [(None, info)]):
            key = f"{table}.{name}" if name else table
            assert f"  {key} = " in text and f.description in text, key
    for tname, cls in TRAINER_CONFIGS.items():
        block = text.split(f'trainer.name = "{tname}"')[1].split("trainer.name = ")[0]
        for name, f in config_fields(cls).items():
            assert f"  trainer.{name} = " in block and f.description in block, (tname, name)
    assert '  data.embedded_sources = ["wiki", "c4", "tiny"]  (list["wiki" | "c4" | "tiny"])' in text
    assert "  trainer.adam_beta1 = 0.9  (float ≥0 <1)" in text


def test_read_ahead_auto_is_two_chunks_on_a_gpu_and_in_turn_on_a_cpu():
    """data.prefetch_chunks: auto resolves by device (measured: on a 2-core CPU the reader's threads slow the
    SAE step more than the overlap gains); a number is kept; a bad value's line says what the key takes."""
    import torch

    from workbench.stream import read_ahead_depth

    assert load_config(QS).data.prefetch_chunks == "auto"
    assert read_ahead_depth("auto", torch.device("cpu")) == 0
    assert read_ahead_depth("auto", torch.device("cuda", 0)) == 2
    assert read_ahead_depth(3, torch.device("cpu")) == 3 and read_ahead_depth(0, torch.device("cuda")) == 0
    assert load_config(QS, ["data.prefetch_chunks=5"]).data.prefetch_chunks == 5
    with pytest.raises(ConfigError) as e:
        load_config(QS, ["data.prefetch_chunks=-2"])
    assert str(e.value) == """config key 'data.prefetch_chunks' must be int ≥0 | "auto", got -2"""
