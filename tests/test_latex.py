"""The writeup template compiles (with and without plot.py's figures) and cites every listed work."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

LATEX = Path(__file__).resolve().parent.parent / "latex"
CITED = ["gaoScalingEvaluatingSparse", "chaninAbsorptionStudyingFeature2024", "bussmannBatchTopKSparseAutoencoders2024",
         "rajamanoharanJumpingAheadImproving2024", "farrellApplyingSparseAutoencoders2024",
         "marksSparseFeatureCircuits2024", "goodfellow2016deep", "korznikovOrtSAE2025", "jinC2R2026"]
SECTIONS = ["Introduction", "Background", "Method", "Experimental Setup", "Results", "Conclusion"]


def test_template_has_sections_figures_and_references():
    tex = (LATEX / "template.tex").read_text()
    assert re.search(r"\\title\{", tex) and "\\begin{abstract}" in tex
    for s in SECTIONS:
        assert f"\\section{{{s}}}" in tex
    for fig in ("absorption_comparison.png", "reconstruction_quality.png", "sparsity_metrics.png",
                "sparse_probing_accuracy.png", "pareto_l0.png"):
        assert fig in tex
    bib = (LATEX / "references.bib").read_text()
    for key in CITED:
        assert f"{{{key}," in bib and key in tex


@pytest.mark.skipif(shutil.which("pdflatex") is None or shutil.which("bibtex") is None,
                    reason="no LaTeX toolchain (.ci/run installs texlive-latex-base from Debian)")
@pytest.mark.parametrize("with_figures", [False, True])
def test_template_compiles(tmp_path, with_figures):
    work = tmp_path / "latex"
    shutil.copytree(LATEX, work)
    if with_figures:  # a real PNG where plot.py would put it (the repository root = latex/..)
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])
        fig.savefig(tmp_path / "pareto_l0.png")
        plt.close(fig)
    run = lambda *cmd: subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=120)
    for cmd in (["pdflatex", "-interaction=nonstopmode", "template"], ["bibtex", "template"],
                ["pdflatex", "-interaction=nonstopmode", "template"], ["pdflatex", "-interaction=nonstopmode", "template"]):
        r = run(*cmd)
        assert r.returncode == 0, r.stdout[-2000:]
    assert (work / "template.pdf").stat().st_size > 10_000
    log = (work / "template.log").read_text(errors="replace")
    assert "Citation" not in log or "undefined" not in log  # every \cite resolved
    assert ("pareto_l0.png" in log) == with_figures  # the figure was included when present


def test_study_writeup_is_filled_and_cites_every_work():
    """latex/absorption_study.tex: the template filled from the study's runs (no placeholder left), its
    figures beside it."""
    tex = (LATEX / "absorption_study.tex").read_text()
    for placeholder in ("TITLE", "AUTHORS", "ABSTRACT", "CONTRIBUTIONS", "METHOD:", "RESULTS:", "CONCLUSION",
                        "WIDTHSECTION", "MODEL, HOOK"):
        assert placeholder not in tex, placeholder
    for s in SECTIONS:
        assert f"\\section{{{s}}}" in tex
    for fig in re.findall(r"\\runfigure\{([^}]+)\}", tex):
        assert (LATEX / "figures" / fig).is_file(), fig
    for key in CITED:
        assert key in tex


@pytest.mark.skipif(shutil.which("pdflatex") is None or shutil.which("bibtex") is None,
                    reason="no LaTeX toolchain (.ci/run installs texlive-latex-base from Debian)")
def test_study_writeup_compiles_with_its_figures(tmp_path):
    work = tmp_path / "latex"
    shutil.copytree(LATEX, work)
    run = lambda *cmd: subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=120)
    for cmd in (["pdflatex", "-interaction=nonstopmode", "absorption_study"], ["bibtex", "absorption_study"],
                ["pdflatex", "-interaction=nonstopmode", "absorption_study"],
                ["pdflatex", "-interaction=nonstopmode", "absorption_study"]):
        r = run(*cmd)
        assert r.returncode == 0, r.stdout[-2000:]
    log = (work / "absorption_study.log").read_text(errors="replace")
    assert "undefined" not in log  # every \cite and \ref resolved
    for fig in re.findall(r"\\runfigure\{([^}]+)\}", (work / "absorption_study.tex").read_text()):
        assert f"figures/{fig}" in log, fig  # included, not the placeholder box
