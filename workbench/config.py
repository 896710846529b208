"""Run configuration: pydantic dataclasses with a one-line meaning per field, loaded from TOML plus --set
overrides.

pydantic checks each table on its own (unknown keys, strict types: no "3" for 3 and no true for 1, the
per-field bounds and choices); validate() checks what relates keys to each other. Every error becomes
a ConfigError whose message names the dotted key and the fix; experiment.py turns it into one line on
stderr and exit code 2, before any model loads or any directory is written. The `extends` merge and
the `--set` overrides are ours (no library does them).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import tomli_w
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

EMBEDDED_MODEL = "gemma-3-270m"
EMBEDDED_N_LAYERS = 18  # Gemma-3-270M: layers 0-17
EMBEDDED_DATASET = "embedded"
HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|mlp_out|attn_out)$")


class ConfigError(ValueError):
    """A bad configuration: the message names the key and what to do."""


def configclass(cls: type) -> type:
    """A config table: a dataclass validated by pydantic on construction (and on dataclasses.replace)."""
    return pydantic_dataclass(config=ConfigDict(extra="forbid", strict=True))(cls)


def param(default: Any, doc: str, *, path: bool = False, **bounds: Any) -> Any:
    """A config field: its default, its one-line meaning (errors, --help-config), bounds pydantic checks
    (ge, gt, le, lt, min_length), and path=True for a path made absolute when the config is read."""
    extra = {"path": True} if path else None
    if isinstance(default, (list, dict)):
        return Field(default_factory=lambda d=default: type(d)(d), description=doc, json_schema_extra=extra, **bounds)
    return Field(default=default, description=doc, json_schema_extra=extra, **bounds)


def table(cls: type, doc: str) -> Any:
    """A nested config table with its meaning."""
    return Field(default_factory=cls, description=doc)


def config_fields(cls_or_obj: Any) -> dict:
    """name -> pydantic FieldInfo (annotation, default, description, bounds) of a config table."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    return cls.__pydantic_fields__


@configclass
class ModelConfig:
    name: str = param("google/gemma-2-2b", "TransformerLens model name, or 'gemma-3-270m' for the embedded offline model",
                      min_length=1)
    hook: str = param("blocks.12.hook_resid_post", "hook point the SAE reads, e.g. blocks.12.hook_resid_post")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = param(
        "auto", "LM dtype: float32 | bfloat16 | float16 | auto (bfloat16 where the device multiplies bf16 natively: "
                "CUDA with bf16, a CPU with AMX / AVX512-BF16 / Arm BF16; else float32, as bf16 is emulated there, "
                "5-500x slower); the run records what auto chose")
    device: str = param("auto", "auto (CUDA when present, else CPU) | cpu | cuda | cuda:N")
    harvest: Literal["auto", "hf", "transformer_lens"] = param(
        "auto", "the training harvest's LM forward: hf (the HuggingFace model cut after the hook's layer; "
                "resid_post hooks only; 2.2x faster on a CPU) | transformer_lens | auto (hf for the embedded "
                "model, where a test proves it equal, else transformer_lens). Evals always use TransformerLens")
    fused_kernels: bool = param(True, "C kernels on a CPU: fused RMSNorm, GELU-tanh x up and rotary in the hf harvest of a "
                                      "Gemma-3 (LM batches 1.6x faster in bf16, ~1.1x in float32), the momentum / progressive penalty "
                                      "over co-firing pairs in float32 (3x), and the float32 sparse step's bag and "
                                      "gradients (a TopK step 87 -> 64 ms at the quickstart's size); built once with "
                                      "the system C compiler ($CC or cc); without one, torch's ops")
    onednn_linear: bool = param(True, "the hf harvest on a CPU runs its linear layers through oneDNN with each weight "
                                      "packed once, in float32 (LM batches 1.2x faster than MKL's sgemm on a 2-core "
                                      "AVX2 CPU; float32 round-off apart) and in bf16 where the CPU has bf16 "
                                      "instructions (~3% faster on AVX512-BF16, the same bits); false: torch's F.linear")
    cache_dir: str = param("", "cache for converted embedded weights and built kernels; '' = $SAE_WB_CACHE or "
                               "~/.cache/sae_workbench", path=True)

    @property
    def layer(self) -> int:
        # HOOK_RE validates the hook and gives its layer in one place. (sae_lens.util has the same helper,
        # but importing sae_lens takes ~7 s, and config errors must come back before anything heavy loads.)
        return int(HOOK_RE.match(self.hook).group(1))  # validated before use


@configclass
class DataConfig:
    dataset: str = param("monology/pile-uncopyrighted", "HF dataset streamed from the hub, or 'embedded' (offline text shipped on PyPI)")
    text_field: str = param("text", "column holding the text in a hub dataset")
    split: str = param("train", "split of a hub dataset")
    embedded_sources: list[Literal["wiki", "c4", "tiny"]] = param(["wiki", "c4", "tiny"], "embedded corpora used: any "
                                                                  "of wiki, c4, tiny", min_length=1)
    context_size: int = param(128, "tokens per context window, BOS included (BOS never becomes a sample, so >= 2)", ge=2)
    train_tokens: int = param(5_000_000, "activations (tokens) the SAE trains on", ge=1)
    llm_batch_size: int = param(32, "contexts per LM forward pass", ge=1)
    buffer_batches: int = param(32, "shuffling buffer size, in SAE batches; tokens from many contexts mix there", ge=1)
    eval_fraction: float = param(0.05, "fraction of documents held out for evaluation and never trained on", gt=0, lt=0.5)
    norm_tokens: int = param(100_000, "tokens used to estimate the normalization scale s (E||s x||^2 = d)", ge=1)
    prefetch_chunks: Annotated[int, Field(ge=0)] | Literal["auto"] = param(
        "auto", "chunks (LM batches or cache reads) produced ahead in a background thread while the SAE trains; "
                "0 = in turn; auto = 2 on a GPU, 0 on a CPU, where the reader's threads would take the SAE step's "
                "cores (in turn measured faster there: cold and warm runs, 2 cores); same batches either way")


@configclass
class SAEConfig:
    d_sae: int = param(16384, "number of latents n", ge=1)
    batch_size: int = param(2048, "activations per SAE training step (the seeds' sae_batch_size)", ge=1)
    compute_dtype: Literal["auto", "float32", "bfloat16"] = param(
        "float32", "SAE training matmuls: float32, bfloat16 (autocast; weights and Adam stay float32), or auto "
                   "(bfloat16 where the device multiplies bf16 natively, as model.dtype)")
    sparse_step: Literal["auto", "on", "off"] = param(
        "auto", "TopK-family, ReLU and JumpReLU trainers: the step that touches only the selected latents (ReLU: the active "
                "ones, while they are at most 8% of the batch's entries) outside the encoder forward "
                "(embedding-bag decoder, sparse encoder backward; same loss and gradients as the dense one) | off "
                "(dense) | auto (sparse except bfloat16 below 8192 latents on a matrix engine, AMX or a GPU, where the dense "
                "step measured faster)")


@configclass
class EvalConfig:
    types: list[str] = param(["core"], "evaluations to run after training (see evals/)")
    ce_contexts: int = param(256, "held-out contexts for the CE-loss / KL part of core", ge=1)
    ce_batch_size: int = param(8, "contexts per forward in the CE-loss / KL part (memory: logits are contexts x ctx x "
                                  "vocab)", ge=1)
    variance_tokens: int = param(200_000, "held-out tokens for the reconstruction, sparsity and shrinkage part of core",
                                 ge=1)
    llm_batch_size: int = param(32, "prompts per LM forward in the sae_bench evals (the seeds: 32 on gemma-2-2b)", ge=1)
    absorption_words: int = param(0, "absorption: seeded sample of single-token alphabetic words (0 = all, as SAEBench)",
                                  ge=0)
    absorption_words_per_letter: int = param(0, "absorption: stratified sample, up to this many words per first "
                                                "letter (rare letters get enough to probe); 0 = use absorption_words",
                                             ge=0)
    absorption_min_letters: int = param(20, "absorption: letters whose ground-truth probe F1 > 0.6 needed for a result",
                                        ge=1)
    sae_probes_datasets: list[str] = param([], "sae_probes: dataset names shipped in the sae_probes wheel ([] = all 113)")
    sae_probes_ks: list[int] = param([1, 2, 5], "sae_probes: numbers of latents k the probes may use (each >= 1)",
                                     min_length=1)
    sae_probes_llm_baseline: bool = param(True, "sae_probes: also fit the probe on the raw activations (the ceiling)")
    probe_k_values: list[int] = param([1, 2, 5, 10, 20, 50], "sparse_probing / scr / tpp: latent counts k (the seeds'; "
                                                            "each >= 1)", min_length=1)
    probe_train_set_size: int = param(4000, "sparse_probing: probe training examples per dataset (the seeds')", ge=1)
    probe_test_set_size: int = param(1000, "sparse_probing: probe test examples per dataset (the seeds')", ge=1)
    probe_context_length: int = param(128, "sparse_probing / scr / tpp: tokens per example (the seeds')", ge=2)
    unlearning_model: str = param("", "unlearning: instruction-tuned model to evaluate on (e.g. google/gemma-2-2b-it); '' = skip")
    wmdp_corpus: str = param("", "unlearning: path to the gated WMDP bio-forget-corpus.jsonl; '' = skip", path=True)
    autointerp_n_latents: int = param(1000, "autointerp: latents explained and scored (SAEBench default)", ge=1)


@configclass
class CacheConfig:
    enabled: bool = param(True, "reuse activations across runs with the same model, hook, text and budget")
    dir: str = param("", "activation cache folder; '' = $SAE_WB_CACHE/activations or ~/.cache/sae_workbench/activations",
                     path=True)
    max_gb: float = param(50.0, "size limit; least recently used entries are evicted, a larger single run is not cached",
                          gt=0)


@configclass
class LogConfig:
    every_steps: int = param(10, "training-log (JSONL) interval in steps", ge=1)
    checkpoint_every: int = param(200, "steps between checkpoints that an interrupted run resumes from (0 = none)", ge=0)
    progress: bool = param(True, "show progress bars")
    wandb: bool = param(False, "also log to Weights & Biases (never required)")
    wandb_project: str = param("sae-workbench", "wandb project name")


@configclass
class DistConfig:
    sweep_over_ranks: bool = param(False, "under torchrun with a [[sweep]]: each rank steps its own trainers (trainer i "
                                          "on rank i % N) on the whole global batch, so N trainers cost about one; "
                                          "false: every trainer's batch is split across the ranks (data parallel)")


@configclass
class RunConfig:
    seed: int = param(42, "seed for data order, SAE init and every random choice")
    model: ModelConfig = table(ModelConfig, "the language model and the hook the SAE reads")
    data: DataConfig = table(DataConfig, "the text, its context windows and the activation stream")
    sae: SAEConfig = table(SAEConfig, "the SAE's size, batch and compute dtype")
    trainer: Any = param(None, "a registered trainer's config table (trainers/), chosen by trainer.name")
    sweep: list = param([], "extra trainers on the same activation stream: [(label, trainer config)] from [[sweep]] "
                            "tables; each is merged over [trainer] when it names the same trainer (or none), and "
                            "writes {out_dir}_{label}")
    eval: EvalConfig = table(EvalConfig, "evaluations after training")
    cache: CacheConfig = table(CacheConfig, "the activation cache")
    log: LogConfig = table(LogConfig, "training log, checkpoints, progress")
    dist: DistConfig = table(DistConfig, "torchrun: how the ranks share the work (ignored in one process)")

    @property
    def total_steps(self) -> int:
        return self.data.train_tokens // self.sae.batch_size


# ---------------------------------------------------------------- building from dicts

def _type_name(annot: Any) -> str:
    """int, float, list[int], "a" | "b" (a Literal's choices), list["a" | "b"]."""
    origin, args = typing.get_origin(annot), typing.get_args(annot)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is Annotated:  # a union member with its own bounds: int >= 0
        return " ".join([_type_name(args[0]), *_bounds_text(m for f in args[1:] for m in f.metadata)])
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is list and args:
        return f"list[{_type_name(args[0])}]"
    return getattr(annot, "__name__", str(annot))


def _bounds_text(metadata) -> list[str]:
    """pydantic's bound objects as ["≥0", "<1"]."""
    return [f"{k}{v}" for m in metadata for k, v in (("≥", getattr(m, "ge", None)), (">", getattr(m, "gt", None)),
                                                    ("≤", getattr(m, "le", None)), ("<", getattr(m, "lt", None)))
            if v is not None]


def _one_line(err: dict, cls: type, prefix: str) -> str:
    """pydantic's first error as our one line: the dotted key, what it must be, what it got."""
    loc = [str(p) for p in err["loc"]]
    key = f"{prefix}.{loc[0]}" if prefix else loc[0]
    where = f" item {loc[1]}" if len(loc) > 1 else ""
    kind, got, ctx = err["type"], err.get("input"), err.get("ctx", {})
    fields = config_fields(cls)
    if len(loc) > 1 and typing.get_origin(fields[loc[0]].annotation) in (typing.Union, types.UnionType):
        # pydantic reports each member's complaint (loc[1] names the member): say what the key takes
        return f"config key '{key}' must be {_type_name(fields[loc[0]].annotation)}, got {got!r}"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        close = [k for k in fields if k.startswith(loc[0][:3])]
        hint = f" (did you mean {', '.join(prefix + '.' + c if prefix else c for c in close)}?)" if close else ""
        return f"unknown config key '{key}'{hint}; valid keys: {', '.join(fields)}"
    bound = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"), "less_than_equal": ("<=", "le"),
             "less_than": ("<", "lt")}.get(kind)
    if bound:
        return f"config key '{key}'{where} must be {bound[0]} {ctx[bound[1]]}, got {got!r}"
    if kind == "literal_error":
        return f"config key '{key}'{where} must be one of {ctx['expected']}, got {got!r}"
    if kind == "too_short":
        return f"config key '{key}' must have at least {ctx['min_length']} item(s), got {got!r}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        want = _type_name(fields[loc[0]].annotation) if not where else kind.split("_")[0]
        return f"config key '{key}'{where} must be {want}, got {got!r} ({type(got).__name__})"
    return f"config key '{key}'{where}: {err['msg']}, got {got!r}"


def build_dataclass(cls: type, values: dict, prefix: str) -> Any:
    """Instantiate the config table `cls` from a dict (nested tables first); pydantic's first complaint
    (unknown key, wrong type, out of bounds) becomes a ConfigError naming the dotted key."""
    fields = config_fields(cls)
    kwargs = dict(values)
    for key, value in values.items():
        sub = fields[key].default_factory if key in fields else None
        if isinstance(sub, type) and dataclasses.is_dataclass(sub):
            name = f"{prefix}.{key}" if prefix else key
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{name}' must be a table")
            kwargs[key] = build_dataclass(sub, value, name)
    try:
        return cls(**kwargs)
    except ValidationError as e:
        raise ConfigError(_one_line(e.errors()[0], cls, prefix)) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (['a','b'], value); value is read as TOML (numbers, bools, lists), else as a string."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def merge_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: '{part}' is not a table")
        node[path[-1]] = value
    return tree


def deep_merge(base: dict, child: dict) -> dict:
    """child over base, tables merged key by key."""
    out = dict(base)
    for k, v in child.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_toml_tree(path: Path, _seen: tuple = ()) -> dict:
    """A config file's tree; `extends = "other.toml"` (relative to this file) is read first and merged under it."""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found; pass --config run_configs/quickstart.toml or another file")
    if path.resolve() in _seen:
        raise ConfigError(f"config file '{path}' extends itself (cycle through {[str(p) for p in _seen]})")
    try:
        tree = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}") from None
    parent = tree.pop("extends", None)
    if parent is None:
        return tree
    if not isinstance(parent, str):
        raise ConfigError(f"config key 'extends' in '{path}' must be a file name")
    base = read_toml_tree(path.parent / parent, _seen + (path.resolve(),))
    child_trainer = tree.get("trainer", {}).get("name")
    if child_trainer and child_trainer != base.get("trainer", {}).get("name"):
        base.pop("trainer", None)  # another trainer: the parent's trainer fields do not apply to it
    return deep_merge(base, tree)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML file (default run_configs/default.toml), apply overrides, validate everything."""
    path = Path(path).expanduser() if path else Path(__file__).resolve().parent.parent / "run_configs" / "default.toml"
    return config_from_dict(merge_overrides(read_toml_tree(path), list(overrides)))


def absolute_path(path: str | Path) -> Path:
    """A user-given path as an absolute one: `~` expanded, relative to the working directory at the entry
    point. Paths are resolved once, when the config is read, so nothing later depends on the cwd."""
    return Path(os.path.abspath(Path(path).expanduser()))


def resolve_paths(obj: Any) -> None:
    """Make every field marked path=True (non-empty) absolute, in place, through nested configs."""
    for name, info in config_fields(obj).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            resolve_paths(value)
        elif (info.json_schema_extra or {}).get("path") and value:
            setattr(obj, name, str(absolute_path(value)))


# ---------------------------------------------------------------- registries handed in from above
# trainers/ and evals/ register here when imported (SAELens's registry pattern). workbench reads these and
# never imports those packages, so imports point one way: workbench <- trainers, evals <- entry points.
TRAINER_CONFIGS: dict[str, type] = {}  # trainer name -> its Config dataclass (filled by trainers.base.register)
EVAL_CHECKS: dict[str, Callable[["RunConfig"], None] | None] = {}  # eval name -> its own config check (evals/)


def _registered() -> None:
    if not TRAINER_CONFIGS or not EVAL_CHECKS:
        raise RuntimeError("no trainers or evals are registered: `import trainers, evals` before loading a config")


def trainer_config_from_dict(tree: dict) -> Any:
    """A registered trainer's Config from {"name": ..., its fields}."""
    _registered()
    tree = dict(tree)
    name = tree.pop("name", None)
    if name is None:
        raise ConfigError(f"config key 'trainer.name' is missing; pick one of {sorted(TRAINER_CONFIGS)}")
    if name not in TRAINER_CONFIGS:
        raise ConfigError(f"config key 'trainer.name' = '{name}' is not a trainer; known: {sorted(TRAINER_CONFIGS)}")
    return build_dataclass(TRAINER_CONFIGS[name], tree, "trainer")


def config_from_dict(tree: dict) -> RunConfig:
    tree = dict(tree)
    trainer_tree = tree.pop("trainer", {"name": "topk"})
    sweep_tree = tree.pop("sweep", [])
    if not isinstance(trainer_tree, dict):
        raise ConfigError("config key 'trainer' must be a table with a 'name'")
    if not isinstance(sweep_tree, list) or not all(isinstance(t, dict) for t in sweep_tree):
        raise ConfigError("config key 'sweep' must be a list of trainer tables ([[sweep]] in TOML)")
    cfg = build_dataclass(RunConfig, tree, "")
    cfg.trainer = trainer_config_from_dict(trainer_tree)
    labels = set()
    for i, entry in enumerate(sweep_tree):
        entry = dict(entry)
        label = str(entry.pop("label", f"{i + 1}_{entry.get('name', trainer_tree.get('name'))}"))
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or label in labels:
            raise ConfigError(f"config key 'sweep[{i}].label' = '{label}' must be unique and use only letters, digits, _ . -")
        labels.add(label)
        same = entry.get("name", trainer_tree.get("name")) == trainer_tree.get("name")
        try:
            cfg.sweep.append((label, trainer_config_from_dict(deep_merge(trainer_tree, entry) if same else entry)))
        except ConfigError as e:
            raise ConfigError(f"in sweep[{i}] ({label}): {e}") from None
    resolve_paths(cfg)
    validate(cfg)
    return cfg


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}' {msg}")


def validate(cfg: RunConfig) -> None:
    """Value checks that need no model: ranges, names, relations between keys."""
    m, d, s, e = cfg.model, cfg.data, cfg.sae, cfg.eval
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", m.device) is not None, "model.device",
           f"must be auto, cpu, cuda or cuda:N, got '{m.device}'")
    _check(HOOK_RE.match(m.hook) is not None, "model.hook",
           f"must look like blocks.L.hook_resid_post (resid_pre/resid_mid/mlp_out/attn_out also work), got '{m.hook}'")
    if m.name == EMBEDDED_MODEL:
        _check(m.layer < EMBEDDED_N_LAYERS, "model.hook",
               f"layer {m.layer} is out of range: {EMBEDDED_MODEL} has layers 0-{EMBEDDED_N_LAYERS - 1}")
    _check(m.harvest != "hf" or m.hook.endswith(".hook_resid_post"), "model.harvest",
           f"hf reads resid_post hooks only (the HF layer outputs), got hook '{m.hook}'; use auto or transformer_lens")
    _check(d.train_tokens >= s.batch_size, "data.train_tokens", f"must be >= sae.batch_size ({s.batch_size})")
    _registered()
    unknown = [t for t in e.types if t not in EVAL_CHECKS]
    _check(not unknown, "eval.types", f"names unknown evaluation(s) {unknown}; known: {sorted(EVAL_CHECKS)}")
    for name in ("sae_probes_ks", "probe_k_values"):
        _check(all(k >= 1 for k in getattr(e, name)), f"eval.{name}", "must be a list of ints >= 1")
    for name in e.types:  # checks that need an eval's own data (e.g. the dataset names a wheel ships)
        if EVAL_CHECKS[name] is not None:
            EVAL_CHECKS[name](cfg)
    cfg.trainer.validate(cfg)
    for label, trainer in cfg.sweep:
        try:
            trainer.validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"in sweep ({label}): {e}") from None


# ---------------------------------------------------------------- the key reference

def _default_text(info: Any) -> str:
    value = info.default_factory() if info.default_factory is not None else info.default
    return json.dumps(value, ensure_ascii=False) if value is not None else "(none)"  # TOML for these values


def config_reference() -> str:
    """Every key with its type, default and meaning, from the pydantic fields (`--help-config`): the run
    tables, then each registered trainer's keys."""
    _registered()

    def rows(cls: type, prefix: str) -> list[str]:
        out = []
        for name, info in config_fields(cls).items():
            if isinstance(info.default_factory, type) and dataclasses.is_dataclass(info.default_factory):
                out += ["", f"[{prefix}{name}]  {info.description}"] + rows(info.default_factory, f"{prefix}{name}.")
            elif name not in ("trainer", "sweep"):
                bounds = " ".join(_bounds_text(info.metadata))
                kind = _type_name(info.annotation) + (f" {bounds}" if bounds else "")
                out.append(f"  {prefix}{name} = {_default_text(info)}  ({kind})\n      {info.description}")
        return out

    lines = ["Config keys: set them in a TOML file (--config) or with --set KEY=VALUE.", ""]
    lines += rows(RunConfig, "")
    lines += ["", "[trainer]  trainer.name picks one; [[sweep]] tables take the same keys plus a label"]
    for name, cls in sorted(TRAINER_CONFIGS.items()):
        what = (sys.modules[cls.__module__].__doc__ or cls.__name__).strip().splitlines()[0]
        lines += ["", f"trainer.name = \"{name}\"  ({what})"]
        lines += rows(cls, "trainer.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- saving

def config_to_dict(cfg: RunConfig) -> dict:
    """The resolved config of one run (the sweep's entries are resolved into runs of their own)."""
    out = dataclasses.asdict(dataclasses.replace(cfg, sweep=[]))
    out.pop("sweep")
    out["trainer"] = {"name": cfg.trainer.name, **dataclasses.asdict(cfg.trainer)}
    return out


def sweep_runs(cfg: RunConfig, out_dir: Path) -> list[tuple[Path, RunConfig]]:
    """(run directory, single-trainer config) for the main trainer and each sweep entry."""
    runs = [(out_dir, dataclasses.replace(cfg, sweep=[]))]
    for label, trainer in cfg.sweep:
        runs.append((out_dir.parent / f"{out_dir.name}_{label}", dataclasses.replace(cfg, trainer=trainer, sweep=[])))
    return runs


def _without_none(tree: dict) -> dict:
    return {k: _without_none(v) if isinstance(v, dict) else v for k, v in tree.items() if v is not None}


def to_toml(tree: dict) -> str:
    """A config tree as TOML (tomli-w: every string form escaped, as tomllib reads it back). None values,
    which TOML cannot hold, are left out: the key's default applies when the file is read."""
    return tomli_w.dumps(_without_none(tree))


def preflight(cfg: RunConfig) -> None:
    """Checks that need a registry or the hub but no model weights: an unknown model name or a dataset
    that cannot be found fails here, before anything loads or is written. Skipped for the embedded
    model and text; the dataset look-up is skipped when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set."""
    import os

    if cfg.model.name != EMBEDDED_MODEL:
        from transformer_lens.loading_from_pretrained import get_official_model_name
        try:
            get_official_model_name(cfg.model.name)
        except ValueError:
            raise ConfigError(f"config key 'model.name': '{cfg.model.name}' is not a TransformerLens model; "
                              f"use an official name (e.g. google/gemma-2-2b) or '{EMBEDDED_MODEL}'") from None
    if cfg.data.dataset != EMBEDDED_DATASET and not (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")):
        from huggingface_hub import HfApi
        try:
            HfApi().dataset_info(cfg.data.dataset, timeout=20)
        except Exception as e:
            raise ConfigError(f"config key 'data.dataset': cannot find '{cfg.data.dataset}' on the HuggingFace hub "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}); check the name "
                              f"and network, or run offline with --config run_configs/quickstart.toml") from None
