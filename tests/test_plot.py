"""plot.py: bad runs are named with their reason; the Pareto points are the runs' own numbers;
groups by model/hook; labels from differing hyperparameters; missing metrics are gaps."""
import json
import math


import plot


def make_run(root, name, trainer="topk", l0=32.0, ev=0.9, ce=0.95, model="gemma-3-270m",
             hook="blocks.6.hook_resid_post", extra_trainer=None, core=True, machine=None, dtype="bfloat16"):
    d = root / name
    d.mkdir()
    tcfg = {"name": trainer, "k": int(l0), "lr": 1e-3, **(extra_trainer or {})}
    info = {"training results for layer 6": {"config": {}, "final_info": {},
                                             "provenance": {"model": model, "hook": hook, "train_tokens": 1000,
                                                                            "llm_dtype": dtype,
                                                                            **({"machine": machine} if machine else {})}},
            "run config": {"trainer": tcfg, "sae": {"d_sae": 2048}, "model": {"name": model, "hook": hook}}}
    if core:
        info["core evaluation results"] = {"metrics": {
            "sparsity": {"l0": l0, "l1": 10.0}, "reconstruction_quality": {"explained_variance": ev, "mse": 1.0},
            "model_performance_preservation": {"ce_loss_score": ce}, "misc": {"frac_alive": 0.9}}}
    (d / "final_info.json").write_text(json.dumps(info))
    (d / "train_log.jsonl").write_text("\n".join(json.dumps({"step": s, "tokens": s * 100, "loss": 10 - s,
                                                             "fvu": 0.5, "l0": l0, "dead_frac": 0.0})
                                                 for s in range(5)) + "\n")
    return d


def test_bad_runs_are_each_named_with_a_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, "run_1")
    (tmp_path / "run_2").mkdir()                                   # unfinished: config written, no result
    (tmp_path / "run_2" / "config.toml").write_text("seed = 42\n")
    (tmp_path / "run_3").mkdir()
    (tmp_path / "run_3" / "final_info.json").write_text("{\"training results")   # truncated JSON
    (tmp_path / "run_4").mkdir()
    (tmp_path / "run_4" / "final_info.json").write_text(json.dumps({"core evaluation results": {}}))  # partial
    (tmp_path / "run_5").mkdir()
    (tmp_path / "run_5" / "failed.txt").write_text("loss is nan at step 7\n")
    d6 = make_run(tmp_path, "run_6")
    info = json.loads((d6 / "final_info.json").read_text())
    del info["run config"]
    (d6 / "final_info.json").write_text(json.dumps(info))
    assert plot.main(["--out", str(tmp_path / "figs")]) == 0
    err = capsys.readouterr().err
    assert "run_2: unfinished" in err
    assert "run_3: final_info.json is not valid JSON" in err
    assert "run_4: final_info.json has no 'training results" in err
    assert "run_5: failed: loss is nan at step 7" in err
    assert "run_6: final_info.json has no 'run config'" in err
    assert "run_1" not in err
    assert (tmp_path / "figs" / "pareto_l0.png").is_file() and (tmp_path / "figs" / "summary.md").is_file()


def test_only_run_directories_are_considered(tmp_path, monkeypatch, capsys):
    """run_configs/ (and any run_* folder without a run's files) is not a run and is never listed."""
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, "run_1")
    (tmp_path / "run_configs").mkdir()
    (tmp_path / "run_configs" / "quickstart.toml").write_text("seed = 1\n")
    (tmp_path / "run_notes").mkdir()
    (tmp_path / "run_9").mkdir()
    (tmp_path / "run_9" / "checkpoint.pt").write_bytes(b"")      # an interrupted run: named
    assert [d.name for d in plot.find_runs(tmp_path)] == ["run_1", "run_9"]
    assert plot.main(["--out", "figs"]) == 0
    err = capsys.readouterr().err
    assert "run_configs" not in err and "run_notes" not in err and "run_9: unfinished" in err
    assert (tmp_path / "figs" / "summary.md").is_file()


def test_run_and_out_paths_in_every_form(tmp_path, monkeypatch, capsys):
    """Relative, absolute, ~-prefixed and space-containing run and --out paths give the same result."""
    home = tmp_path / "home dir"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    make_run(home, "run_a")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    forms = [("~/run_a", "~/figs 1"), (str(home / "run_a"), str(home / "figs 2")), ("../home dir/run_a", "../home dir/figs 3")]
    for run_arg, out_arg in forms:
        assert plot.main([run_arg, "--out", out_arg]) == 0, run_arg
        out = home / out_arg.split("/")[-1]
        assert (out / "summary.md").is_file() and "run_a" in (out / "summary.md").read_text()


def test_pareto_points_equal_final_info_numbers(tmp_path):
    runs = []
    for i, (t, l0, ev, ce) in enumerate([("topk", 32, 0.93, 0.94), ("topk", 64, 0.95, 0.96),
                                         ("relu", 75, 0.936, 0.937), ("momentum", 32, 0.931, 0.93)]):
        run, why = plot.load_run(make_run(tmp_path, f"run_{i}", t, l0, ev, ce))
        runs.append(run)
    plot.auto_labels(runs)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plot.pareto_figure(plt, runs, "t")
    for ax, key in zip(fig.axes, ("explained_variance", "ce_loss_score")):
        plotted = sorted(tuple(map(float, xy)) for coll in ax.collections for xy in coll.get_offsets())
        expected = []
        for r in runs:
            info = json.loads((r.path / "final_info.json").read_text())["core evaluation results"]["metrics"]
            group = "reconstruction_quality" if key == "explained_variance" else "model_performance_preservation"
            expected.append((info["sparsity"]["l0"], info[group][key]))
        assert plotted == sorted(expected)
        assert {c.get_label() for c in ax.collections} == {"topk", "relu", "momentum"}  # one marker per trainer
    plt.close(fig)


def test_groups_labels_and_gaps(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_run(tmp_path, "run_a", "topk", 32)
    make_run(tmp_path, "run_b", "topk", 64)
    make_run(tmp_path, "run_c", "momentum", 32, extra_trainer={"lambda2": 0.1})
    make_run(tmp_path, "run_d", "topk", 32, model="google/gemma-2-2b", hook="blocks.12.hook_resid_post", core=False)
    assert plot.main(["--out", "figs", "--label", "run_b=wide k"]) == 0
    names = {p.name for p in (tmp_path / "figs").iterdir()}
    assert "pareto_l0__gemma-3-270m__blocks.6.hook_resid_post.png" in names
    assert "pareto_l0__google-gemma-2-2b__blocks.12.hook_resid_post.png" in names
    summary = (tmp_path / "figs" / "summary.md").read_text()
    assert "| run_a | topk k=32 |" in summary and "| run_b | wide k |" in summary
    assert "| run_c | momentum k=32 |" in summary  # lambda2: no other run has it to differ from
    row_d = next(line for line in summary.splitlines() if line.startswith("| run_d"))
    assert row_d.count("n/a") == len(plot.SUMMARY_COLUMNS) + 1  # no core results: every metric (and the probe) a gap, never a zero
    run, _ = plot.load_run(tmp_path / "run_d")
    assert math.isnan(run.metric("core evaluation results", "metrics", "sparsity", "l0"))


def test_runs_evaluated_on_different_machines_or_dtypes_are_flagged(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cpu_a, cpu_b = "AMD EPYC, 2 CPUs, bf16 instructions: avx512_bf16", "Intel Xeon, 2 CPUs, bf16 instructions: amx_bf16"
    make_run(tmp_path, "run_a", "topk", machine=cpu_a)
    make_run(tmp_path, "run_b", "batchtopk", machine=cpu_a)
    make_run(tmp_path, "run_c", "topk", machine=None)  # from before the machine was recorded: not counted
    assert plot.main(["--out", "same"]) == 0
    assert "note:" not in capsys.readouterr().err and "**Note:**" not in (tmp_path / "same" / "summary.md").read_text()

    make_run(tmp_path, "run_d", "matryoshka", machine=cpu_b)
    make_run(tmp_path, "run_e", "matryoshka", machine=cpu_a, dtype="float32")
    assert plot.main(["--out", "mixed"]) == 0
    err = capsys.readouterr().err
    note = next(line for line in (tmp_path / "mixed" / "summary.md").read_text().splitlines() if "**Note:**" in line)
    for kind in (f"bfloat16 on {cpu_a}", f"bfloat16 on {cpu_b}", f"float32 on {cpu_a}"):
        assert kind in note and kind in err

    # a re-evaluation on cpu_a makes run_d's numbers cpu_a's: only the dtype still differs
    info = json.loads((tmp_path / "run_d" / "final_info.json").read_text())
    info["re-evaluations"] = [{"types": ["absorption"], "machine": cpu_a}]
    (tmp_path / "run_d" / "final_info.json").write_text(json.dumps(info))
    (tmp_path / "run_e").rename(tmp_path / "other_e")
    assert plot.main(["--out", "again"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_notes_are_appended_never_rewritten(tmp_path):
    import experiment
    notes = tmp_path / "notes.txt"
    notes.write_text("my own hypothesis: momentum helps absorption\n")
    final = {"run config": {"trainer": {"name": "topk", "k": 64, "lr": 0.0}},
             "core evaluation results": {"metrics": {"sparsity": {"l0": 64.0},
                                                     "reconstruction_quality": {"explained_variance": 0.95},
                                                     "model_performance_preservation": {"ce_loss_score": 0.97}}}}
    line = experiment.notes_line(tmp_path / "run_9", final)
    experiment.append_notes(notes, [line])
    text = notes.read_text()
    assert text.startswith("my own hypothesis: momentum helps absorption\n")
    assert "run_9: topk k=64 |" in text and "lr=" not in line  # only non-default hyperparameters
    assert "L0 64 EV 0.95 CE 0.97 absorption n/a probe-top1 n/a" in text


def test_seed_spread_and_paired_differences(tmp_path, monkeypatch):
    """Three seeds of topk and of ortsae, one null: mean ± sample std per setting, and paired
    differences against topk computed seed by seed (not the difference of the means' spreads)."""
    monkeypatch.chdir(tmp_path)
    evs = {"topk": [0.90, 0.92, 0.94], "ortsae": [0.91, 0.92, 0.96]}
    for trainer, values in evs.items():
        for seed, ev in zip((1, 2, 3), values):
            d = make_run(tmp_path, f"run_{trainer}_s{seed}", trainer=trainer, ev=ev)
            info = json.loads((d / "final_info.json").read_text())
            info["run config"]["seed"] = seed
            info["absorption evaluation results"] = {"eval_result_metrics": {"mean": {
                "mean_absorption_fraction_score": 0.5 - 0.1 * (trainer == "ortsae"), "mean_full_absorption_score": 0.2}},
                "eval_result_unstructured": {"per_letter": {"a": {"probe_f1": 0.5, "absorption_fraction": None},
                                                            "b": {"probe_f1": 0.9, "absorption_fraction": 0.4}}}}
            (d / "final_info.json").write_text(json.dumps(info))
    d = make_run(tmp_path, "run_null", trainer="null")
    info = json.loads((d / "final_info.json").read_text())
    info["absorption evaluation results"] = {"eval_result_metrics": {"mean": {"mean_absorption_fraction_score": 0.3}}}
    (d / "final_info.json").write_text(json.dumps(info))
    assert plot.main(["--out", "figs"]) == 0
    summary = (tmp_path / "figs" / "summary.md").read_text()
    assert "| topk | 3 | 0.92 ± 0.02 |" in summary          # std of (0.90, 0.92, 0.94) = 0.02
    assert "| ortsae | 3 | 0.93 ± 0.026 |" in summary       # std of (0.91, 0.92, 0.96) = 0.0265
    paired = summary.split("Paired differences: setting − topk")[1]
    # differences per seed: 0.01, 0.00, 0.02 -> mean 0.01, std 0.01; absorption -0.1 on every seed -> std 0
    assert "| ortsae | 3 | 0.01 ± 0.01 |" in paired and "-0.1 ± 0 |" in paired
    assert "batchtopk" not in summary.split("### Across seeds")[1]  # no batchtopk runs: no table against it
    assert (tmp_path / "figs" / "seed_spread.png").is_file() and (tmp_path / "figs" / "absorption_letters.png").is_file()
