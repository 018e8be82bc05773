"""Spectrum: train only the linear modules whose weights carry the most signal.

Spectrum (Hartford et al., 2024, "Spectrum: Targeted Training on Signal to Noise Ratio")
ranks weight matrices by a random-matrix-theory signal-to-noise ratio and trains the top
fraction of each module type. This follows the reference implementation,
github.com/cognitivecomputations/spectrum `spectrum.py` (`calculate_snr_for_layer`,
`_marchenko_pastur_threshold`, `_estimate_sigma_with_full_iqr`,
`_generate_unfrozen_params_yaml`), exactly:

    S      = singular values of the weight matrix (fp32)
    sigma  = IQR(S) / 1.349                       noise scale, from the quartiles of S
    edge   = sigma * (1 + sqrt(short / long))     Marchenko-Pastur bulk edge
    snr    = sum(S > edge) / sum(S <= edge) / max(S)
             (no singular value at or below the edge: inf; an all-zero matrix: 0)

Note the final division by max(S): the score is not scale-free (snr(c*W) = snr(W)/c), so it
ranks matrices of one type (same shape, similar scale) against each other, which is all it
is used for. Selection (`snr_threshold`, see `select_modules`): within each type
(`self_attn.q_proj`, `mlp.down_proj`, ...) the modules above the `snr_threshold` quantile of
their type train, i.e. the top `1 - snr_threshold`. `layers_to_finetune: [i, ...]` trains
every linear module of those transformer layers instead, with no scan.

Embeddings and output head (`fine_tuning.spectrum.train_embeddings`, default true): trained
too, as in the reference, whose generated unfrozen-parameters config always lists
`^lm_head.weight$` and `^model.embed_tokens.weight$` before the SNR-selected modules (here in
both selection modes). They are found by the model's own `get_input_embeddings()` /
`get_output_embeddings()`, not by name, and are not ranked. Tied embeddings
(`tie_word_embeddings`: the head's weight *is* the embedding matrix) are one parameter, trained
once and counted once. `train_embeddings: false` keeps both frozen: with a 49k-token vocabulary
they are a large share of a small model (SmolLM2-135M: 28M of 135M parameters, plus their
optimizer state). Frozen: everything else, norms included, as in the reference, which lists
only linear modules. `spectrum_selection.json` (`embeddings`, `embeddings_tied`) and the table
record what was trained, embeddings and head included, or that the key kept them frozen.

On a 4/8-bit model (`load_in_4bit` with spectrum, as the seed's template does) the SNR of
quantized weights would measure quantization noise, so: load in full precision, scan,
choose, free it, then load quantized with the chosen modules in bitsandbytes' skip list,
so they stay plain fp32 `nn.Linear` and train while the other linear modules are 4-bit and
frozen. The embeddings and head are never quantized (bitsandbytes skips the head and leaves
`nn.Embedding` alone): they train, or stay frozen, in full precision.

If the scan cannot run the run fails: it never falls back to training everything.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from finetune_trainer.contract import world
from finetune_trainer.model.loading import config_error, load_model, model_skeleton
from finetune_trainer.model.modules import layer_index, layer_linear_modules, module_type

if TYPE_CHECKING:
    import torch
    from torch import nn

    from finetune_trainer.config.schema import FineTuneConfig

log = logging.getLogger(__name__)

SELECTION_FILE = "spectrum_selection.json"
TABLE_FILE = "spectrum_selection.txt"
THRESHOLD_FIELD = "fine_tuning.spectrum.snr_threshold"
LAYERS_FIELD = "fine_tuning.spectrum.layers_to_finetune"
EMBEDDINGS_FIELD = "fine_tuning.spectrum.train_embeddings"


class SpectrumScanError(RuntimeError):
    """The SNR scan could not run. Permanent: Spectrum does not guess what to train."""


@dataclass(frozen=True)
class ModuleScore:
    module: str
    type: str
    layer: int | None
    snr: float | None  # None when layers were chosen by index (no scan)
    trained: bool


@dataclass(frozen=True)
class EmbeddingModule:
    """The input embeddings or the output head: not ranked, trained unless the key says no."""

    module: str  # its name in the model, e.g. model.embed_tokens, lm_head
    role: Literal["input_embeddings", "output_head"]
    parameters: list[str]  # as model.named_parameters() names them (a tied weight by its first name)
    numel: int  # of this module's parameters (a tied matrix appears in both rows: see embedding_numel)
    tied_to: str | None  # the other module, when the two share their weight
    trained: bool


@dataclass
class SpectrumSelection:
    mode: Literal["snr", "layers"]
    modules: list[ModuleScore]
    snr_threshold: float | None = None
    layers_to_finetune: list[int] | None = None
    scan_seconds: float | None = None
    quantized_bits: int | None = None
    train_embeddings: bool = True
    embeddings: list[EmbeddingModule] = field(default_factory=list)
    embedding_numel: int = 0  # distinct parameters of `embeddings`: a tied matrix counted once
    types: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.types = sorted({m.type for m in self.modules})

    @property
    def trained(self) -> list[str]:
        """The trained linear modules inside the transformer layers (the SNR/layer choice)."""
        return [m.module for m in self.modules if m.trained]

    @property
    def trained_embeddings(self) -> list[str]:
        """The trained input embeddings / output head modules (empty when the key is false)."""
        return [e.module for e in self.embeddings if e.trained]

    @property
    def embeddings_tied(self) -> bool:
        return any(e.tied_to is not None for e in self.embeddings)

    def _embeddings_phrase(self) -> str:
        if not self.embeddings:
            return "no input embeddings or output head found" if self.train_embeddings else ""
        names = " and ".join(e.module for e in self.embeddings)
        if not self.train_embeddings:
            return f"{names} frozen ({EMBEDDINGS_FIELD}: false)"
        if self.embeddings_tied:
            return f"plus {names} (tied: one matrix, {self.embedding_numel:,} parameters)"
        return f"plus {names} ({self.embedding_numel:,} parameters)"

    def summary(self) -> str:
        n, total = len(self.trained), len(self.modules)
        if self.mode == "snr":
            why = f"top {1 - self.snr_threshold:.0%} SNR of each of {len(self.types)} module types"  # type: ignore[operator]
        else:
            why = f"every linear module of layers {self.layers_to_finetune}"
        rest = f"the rest frozen in {self.quantized_bits}-bit" if self.quantized_bits else "the rest frozen"
        embeddings = self._embeddings_phrase()
        return f"{n} of {total} linear modules train ({why}), {embeddings + ', ' if embeddings else ''}{rest}"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["modules"] = [{**asdict(m), "snr": _json_number(m.snr)} for m in self.modules]
        out["embeddings_tied"] = self.embeddings_tied
        return out

    def table(self) -> str:
        """Module types in order, each sorted by SNR (highest first): the ranking at a glance;
        then the input embeddings and output head (not ranked)."""
        rows = sorted(self.modules, key=lambda m: (m.type, -(m.snr if m.snr is not None else 0), m.module))
        width = max(len(m) for m in [*(m.module for m in self.modules), *(e.module for e in self.embeddings), "module"])
        lines = [f"# {self.summary()}", f"{'module':<{width}}  {'type':<20}  {'snr':>12}  trained"]
        for m in rows:
            snr = "-" if m.snr is None else f"{m.snr:12.6g}"
            lines.append(f"{m.module:<{width}}  {m.type:<20}  {snr:>12}  {'yes' if m.trained else 'no'}")
        for e in self.embeddings:
            trained = "yes" if e.trained else f"no ({EMBEDDINGS_FIELD}: false)"
            tied = f", tied to {e.tied_to}" if e.tied_to else ""
            lines.append(f"{e.module:<{width}}  {e.role:<20}  {'-':>12}  {trained}{tied}")
        return "\n".join(lines) + "\n"


def _json_number(value: float | None) -> float | str | None:
    return value if value is None or math.isfinite(value) else str(value)  # JSON has no inf


# ----------------------------------------------------------------------- pure math


def matrix_snr(weight: torch.Tensor) -> float:
    """Spectrum's signal-to-noise ratio of one weight matrix (formula in the module docstring)."""
    import torch

    if weight.ndim != 2:
        raise ValueError(f"matrix_snr needs a 2-D weight matrix, got shape {tuple(weight.shape)}")
    s = torch.linalg.svdvals(weight.detach().to(torch.float32))
    top = s.max()
    if top <= 0:
        return 0.0
    q75, q25 = torch.quantile(s, torch.tensor([0.75, 0.25], device=s.device))
    sigma = (q75 - q25) / 1.349
    short, long = sorted(weight.shape)
    edge = sigma * (1 + math.sqrt(short / long))
    signal = s[s > edge].sum()
    noise = s[s <= edge].sum()
    if noise == 0:
        return math.inf
    return float(signal / noise / top)


def keep_count(n: int, snr_threshold: float) -> int:
    """How many of a type's `n` modules train: the top (1 - threshold), rounded down as the
    reference does, but at least one while the threshold is below 1."""
    k = math.floor(n * (1 - snr_threshold) + 1e-9)
    return max(k, 1) if snr_threshold < 1 and n > 0 else k


def select_modules(snrs: dict[str, float], snr_threshold: float) -> set[str]:
    """The modules above the `snr_threshold` quantile of their type's SNR. Ties break by
    name, so every rank of a distributed run picks the same set."""
    by_type: dict[str, list[str]] = {}
    for name in snrs:
        by_type.setdefault(module_type(name), []).append(name)
    chosen: set[str] = set()
    for names in by_type.values():
        ranked = sorted(names, key=lambda n: (-snrs[n], n))
        chosen.update(ranked[: keep_count(len(names), snr_threshold)])
    return chosen


def select_layers(module_names: list[str], layers: list[int]) -> set[str]:
    """Every module of the given transformer layers; an index the model lacks is an error."""
    present = sorted({i for i in map(layer_index, module_names) if i is not None})
    missing = sorted(set(layers) - set(present))
    if missing:
        valid = f"{present[0]}-{present[-1]}" if present else "none"
        raise config_error(
            LAYERS_FIELD,
            f"layer{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} "
            f"do{'' if len(missing) > 1 else 'es'} not exist; this model has {len(present)} layers, indices {valid}",
        )
    return {name for name in module_names if layer_index(name) in set(layers)}


# ----------------------------------------------------------------------- model edges


def scan_device() -> torch.device | None:
    """This process's GPU when there is one: an SVD there takes a fraction of a second where a
    CPU takes tens of seconds for an 8B model's matrices. None: where the weight lies."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", world().local_rank)
    return None


def scan_snr(model: nn.Module) -> dict[str, float]:
    """SNR of every linear module inside the transformer layers, in model order."""
    device = scan_device()
    modules = layer_linear_modules(model)
    if not modules:
        raise SpectrumScanError(
            "Spectrum found no linear modules inside numbered transformer layers to scan; "
            f"set {LAYERS_FIELD} or use method lora"
        )
    snrs: dict[str, float] = {}
    for name, module in modules.items():
        weight = module.weight
        if weight.device.type == "meta" or weight.numel() == 0 or weight.ndim != 2:
            raise SpectrumScanError(
                f"cannot compute the SNR of {name}: its weight is not materialised here "
                f"(device {weight.device.type}, shape {tuple(weight.shape)}; offloaded or sharded by ZeRO-3?). "
                "Spectrum does not fall back to training everything; load the model whole for the scan "
                f"or set {LAYERS_FIELD}"
            )
        try:
            snr = matrix_snr(weight if device is None else weight.to(device))
        except Exception as exc:  # torch's SVD can fail on non-finite weights
            raise SpectrumScanError(f"cannot compute the SNR of {name}: {exc}") from exc
        if math.isnan(snr):
            raise SpectrumScanError(f"the SNR of {name} is NaN: its weights hold NaN or inf values")
        snrs[name] = snr
    return snrs


def choose(module_names: list[str], cfg: FineTuneConfig, model: nn.Module | None) -> SpectrumSelection:
    """Which modules train: by layer index, or by an SNR scan of `model` (full precision)."""
    spec = cfg.fine_tuning.spectrum
    bits = 4 if cfg.model.load_in_4bit else 8 if cfg.model.load_in_8bit else None
    if spec.layers_to_finetune != "auto":
        chosen = select_layers(module_names, list(spec.layers_to_finetune))
        scores = [ModuleScore(n, module_type(n), layer_index(n), None, n in chosen) for n in module_names]
        return SpectrumSelection("layers", scores, layers_to_finetune=list(spec.layers_to_finetune), quantized_bits=bits)
    assert model is not None
    start = time.perf_counter()
    snrs = scan_snr(model)
    seconds = time.perf_counter() - start
    chosen = select_modules(snrs, spec.snr_threshold)
    if not chosen:
        raise config_error(
            THRESHOLD_FIELD,
            f"{spec.snr_threshold:g} selects no module (modules above the {spec.snr_threshold:.0%} quantile of "
            "their type train, and there are none above 100%); use a value below 1, e.g. 0.5",
        )
    log.info("spectrum: SNR of %d linear modules in %.1f s", len(snrs), seconds)
    scores = [ModuleScore(n, module_type(n), layer_index(n), s, n in chosen) for n, s in snrs.items()]
    return SpectrumSelection("snr", scores, snr_threshold=spec.snr_threshold, scan_seconds=seconds, quantized_bits=bits)


def embedding_modules(model: nn.Module, *, train: bool) -> tuple[list[EmbeddingModule], int]:
    """The input embeddings and output head, by the model's own accessors (names differ between
    architectures: embed_tokens, wte, embed_in, ...), and how many distinct parameters they hold
    (a tied matrix counted once). A model without one of them has no row for it."""
    found: list[tuple[Literal["input_embeddings", "output_head"], nn.Module]] = []
    for role, getter in (("input_embeddings", "get_input_embeddings"), ("output_head", "get_output_embeddings")):
        try:
            module = getattr(model, getter)()
        except (AttributeError, NotImplementedError):
            module = None
        if module is not None and all(module is not m for _, m in found):
            found.append((role, module))  # type: ignore[arg-type]
    module_names = {id(m): n for n, m in model.named_modules()}
    param_names = {id(p): n for n, p in model.named_parameters()}
    own = [{id(p): p for p in module.parameters()} for _, module in found]
    rows = []
    for i, (role, module) in enumerate(found):
        shared = [module_names[id(other)] for j, (_, other) in enumerate(found) if j != i and own[i].keys() & own[j].keys()]
        rows.append(
            EmbeddingModule(
                module=module_names[id(module)],
                role=role,
                parameters=[param_names[k] for k in own[i]],
                numel=sum(p.numel() for p in own[i].values()),
                tied_to=shared[0] if shared else None,
                trained=train,
            )
        )
    distinct = {k: p for params in own for k, p in params.items()}
    return rows, sum(p.numel() for p in distinct.values())


def freeze_all_but(model: nn.Module, selection: SpectrumSelection) -> None:
    """Only the chosen modules' parameters (weight and bias) require gradients, and those of the
    input embeddings and output head while `train_embeddings` (a tied weight is one parameter)."""
    modules = dict(model.named_modules())
    for param in model.parameters():
        param.requires_grad_(False)
    for name in [*selection.trained, *selection.trained_embeddings]:
        module = modules[name]
        if type(module).__module__.startswith("bitsandbytes"):
            raise RuntimeError(f"spectrum: {name} was quantized although it was chosen to train")
        for param in module.parameters():
            param.requires_grad_(True)


def allow_trainer_on_quantized(model: nn.Module) -> None:
    """transformers' Trainer refuses a "purely quantized" model (one without peft adapters)
    by reading `model.is_quantized`. Ours is not: the chosen modules are unquantized and
    train. The quantizer itself stays attached (`hf_quantizer`, `quantization_method`), so
    the Trainer still leaves device placement to bitsandbytes and saving still knows."""
    model.is_quantized = False


def write_selection(selection: SpectrumSelection, output_dir: Path) -> Path:
    """spectrum_selection.json (modules: module, type, layer, snr, trained; embeddings: module,
    role, parameters, numel, tied_to, trained) and a readable table."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / SELECTION_FILE
    _write_atomically(path, json.dumps(selection.to_dict(), indent=2) + "\n")
    _write_atomically(output_dir / TABLE_FILE, selection.table())
    return path


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _unquantized(cfg: FineTuneConfig) -> FineTuneConfig:
    """The same model, full precision, without training-only switches: for the SNR scan."""
    return cfg.model_copy(
        update={
            "model": cfg.model.model_copy(update={"load_in_4bit": False, "load_in_8bit": False, "use_liger_kernels": False}),
            "training": cfg.training.model_copy(update={"gradient_checkpointing": False}),
        }
    )


def _release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_spectrum(
    cfg: FineTuneConfig, *, output_dir: Path | None = None, device_map: Any = None
) -> tuple[nn.Module, SpectrumSelection]:
    quantized = cfg.model.load_in_4bit or cfg.model.load_in_8bit
    by_layers = cfg.fine_tuning.spectrum.layers_to_finetune != "auto"
    if not quantized:
        model = load_model(cfg, device_map=device_map)
        selection = choose(list(layer_linear_modules(model)), cfg, model)
    else:
        if by_layers:  # names from a weightless skeleton: nothing to scan
            selection = choose(list(layer_linear_modules(model_skeleton(cfg))), cfg, None)
        else:
            full = load_model(_unquantized(cfg), device_map=device_map)
            selection = choose(list(layer_linear_modules(full)), cfg, full)
            del full  # before loading the quantized copy: the two never share memory
            _release_memory()
        model = load_model(cfg, skip_modules=selection.trained, device_map=device_map)
        allow_trainer_on_quantized(model)
    train_embeddings = cfg.fine_tuning.spectrum.train_embeddings
    selection.train_embeddings = train_embeddings
    selection.embeddings, selection.embedding_numel = embedding_modules(model, train=train_embeddings)
    if train_embeddings and not selection.embeddings:
        log.warning("spectrum: %s is true but the model has no input embeddings or output head to train", EMBEDDINGS_FIELD)
    freeze_all_but(model, selection)
    log.info("spectrum: %s", selection.summary())
    if output_dir is not None:
        log.info("spectrum: selection written to %s", write_selection(selection, Path(output_dir)))
    return model, selection
