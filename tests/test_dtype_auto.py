"""dtype = auto: bfloat16 only where the device multiplies it natively (workbench.lm.bf16_native).

On a CPU without bf16 instructions torch emulates bf16 matmuls: measured on a 2-core AMD EPYC (AVX2), a
bf16 SAE step took 7.3 s where float32 takes ~60 ms, so there auto must mean float32."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import workbench.cpu_kernels
from tests.helpers import tiny_run_config
from workbench.lm import bf16_native, concrete_dtype, resolve_auto_dtypes

CPU = torch.device("cpu")
LINES = {  # /proc/cpuinfo feature lines
    "sapphire rapids": "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile",
    "zen 4": "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16",
    "zen 3": "flags\t\t: fpu sse2 avx avx2 fma f16c",
    "skylake-x": "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni",
    "neoverse v1": "Features\t: fp asimd sve bf16 i8mm",
    "neoverse n1": "Features\t: fp asimd crc32 atomics",
    "no /proc/cpuinfo": "",
}


@pytest.mark.parametrize("cpu,native", [("sapphire rapids", True), ("zen 4", True), ("zen 3", False),
                                        ("skylake-x", False), ("neoverse v1", True), ("neoverse n1", False),
                                        ("no /proc/cpuinfo", False)])
def test_auto_is_bfloat16_only_on_cpus_with_bf16_instructions(monkeypatch, cpu, native):
    monkeypatch.setattr(workbench.cpu_kernels, "cpu_flags", lambda: LINES[cpu])
    assert bf16_native(CPU)[0] is native
    assert concrete_dtype("auto", CPU) == ("bfloat16" if native else "float32")
    for explicit in ("float32", "bfloat16", "float16"):  # a named dtype is never second-guessed
        assert concrete_dtype(explicit, CPU) == explicit


def test_a_config_resolves_both_keys_and_keeps_everything_else(monkeypatch):
    monkeypatch.setattr(workbench.cpu_kernels, "cpu_flags", lambda: LINES["zen 4"])
    cfg = tiny_run_config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype="auto"),
                              sae=dataclasses.replace(cfg.sae, compute_dtype="auto"))
    resolved = resolve_auto_dtypes(cfg, CPU)
    assert (resolved.model.dtype, resolved.sae.compute_dtype) == ("bfloat16", "bfloat16")
    assert dataclasses.replace(resolved, model=cfg.model, sae=cfg.sae) == cfg
    monkeypatch.setattr(workbench.cpu_kernels, "cpu_flags", lambda: LINES["zen 3"])
    assert (resolve_auto_dtypes(cfg, CPU).model.dtype, resolve_auto_dtypes(cfg, CPU).sae.compute_dtype) == ("float32",) * 2


def test_a_trainer_refuses_an_unresolved_dtype():
    from trainers import make_trainer

    cfg = tiny_run_config()
    with pytest.raises(ValueError, match="compute_dtype must be float32 or bfloat16, got 'auto'"):
        make_trainer(cfg.trainer, d_in=8, d_sae=16, total_steps=10, total_tokens=320, init_acts_BD=torch.randn(4, 8),
                     seed=0, compute_dtype="auto")
