"""Normalization fold and the SAELens on-disk format."""
import json

import pytest
import torch

from workbench.activations import ActivationScaler
from workbench.sae import make_sae, load_sae


def trained_like(arch, seed=0, d=12, n=40, k=5):
    g = torch.Generator().manual_seed(seed)
    sae = make_sae(d, n, arch, k if arch == "topk" else None).init_tied_(g, b_dec=torch.randn(d, generator=g))
    with torch.no_grad():  # move away from the tied init so every weight matters
        for p in sae.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(0.2 * torch.rand(n, generator=g))
    return sae


@pytest.mark.parametrize("arch", ["topk", "standard", "jumprelu"])
def test_fold_equals_trained_sae_on_normalized_inputs(arch):
    g = torch.Generator().manual_seed(1)
    raw = 500 * torch.randn(64, 12, generator=g) + 2000
    scaler = ActivationScaler.estimate(raw)
    assert (scaler(raw).pow(2).sum(1).mean()).item() == pytest.approx(12, rel=1e-5)
    sae = trained_like(arch)
    folded = sae.folded(scaler.scale)
    with torch.no_grad():
        expected = sae(scaler(raw)) / scaler.scale
        torch.testing.assert_close(folded(raw), expected, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(folded.encode(raw), sae.encode(scaler(raw)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "standard", "jumprelu"])
def test_saved_sae_loads_in_sae_lens_with_same_outputs(arch, tmp_path):
    from sae_lens import SAE as LensSAE

    sae = trained_like(arch).folded(0.01)
    sae.save(tmp_path / "sae", {"model_name": "m", "hook_name": "blocks.0.hook_resid_post"})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["d_in"] == 12 and cfg["d_sae"] == 40
    lens = LensSAE.load_from_disk(tmp_path / "sae")
    x = 300 * torch.randn(20, 12)
    with torch.no_grad():
        torch.testing.assert_close(lens.encode(x), sae.encode(x))
        torch.testing.assert_close(lens.decode(lens.encode(x)), sae(x))
    ours = load_sae(tmp_path / "sae")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), sae(x))


def test_load_missing_sae_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_sae(tmp_path)
