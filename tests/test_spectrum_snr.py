"""Spectrum's math and selection, on synthetic matrices and names (no model).

The SNR is the reference implementation's (cognitivecomputations/spectrum): checked here
against hand computations, an independent numpy transcription of the reference, and the
properties that follow from the formula. Note what the formula does NOT say: because it
divides by max(S), a raw score is not scale-free (snr(c*W) = snr(W)/c), so "low-rank signal
+ noise beats pure noise" holds at equal spectral norm (how matrices of one type compare),
not for arbitrary scales.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finetune_trainer.config.issues import ConfigError
from finetune_trainer.methods.spectrum import keep_count, matrix_snr, select_layers, select_modules
from finetune_trainer.model.modules import layer_index, module_type


def with_singular_values(values: list[float], rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A rows x cols matrix whose singular values are exactly `values`."""
    g = torch.Generator().manual_seed(seed)
    k = len(values)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    return (u @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ v.T).float()


def reference_snr(w: np.ndarray) -> float:
    """The reference's steps, transcribed with numpy (its own forms: sqrt((1+sqrt(beta))**2))."""
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    q75, q25 = np.percentile(s, [75, 25])
    sigma = (q75 - q25) / 1.349
    n, m = w.shape
    beta = n / m if n < m else m / n
    threshold = sigma * np.sqrt((1 + np.sqrt(beta)) ** 2)
    return float(s[s > threshold].sum() / s[s <= threshold].sum() / s[0])


# ------------------------------------------------------------------ the formula


def test_square_matrix_by_hand():
    # S = 10,4,3,2,1: quartiles 2 and 4, sigma = 2/1.349, edge = 2*sigma = 2.965 (beta = 1)
    # signal 10+4+3 = 17, noise 2+1 = 3, max 10 -> 17/3/10
    w = torch.diag(torch.tensor([10.0, 4.0, 3.0, 2.0, 1.0]))
    assert matrix_snr(w) == pytest.approx(17 / 3 / 10, rel=1e-6)


def test_rectangular_matrix_by_hand():
    # S = 8,2,1,0.5 in a 4x16 matrix: q25 = 0.875, q75 = 3.5 (linear interpolation),
    # sigma = 2.625/1.349, beta = 4/16, edge = sigma*1.5 = 2.919: signal 8, noise 3.5
    w = with_singular_values([8.0, 2.0, 1.0, 0.5], 4, 16)
    assert matrix_snr(w) == pytest.approx(8 / 3.5 / 8, rel=1e-5)


@pytest.mark.parametrize("shape", [(48, 48), (96, 32), (32, 96), (128, 40)])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_transcription_of_reference(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) + 0.5 * torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)
    expected = reference_snr(w.numpy())
    assert math.isfinite(expected)
    assert matrix_snr(w) == pytest.approx(expected, rel=1e-4)


def test_scale_law_and_transpose():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    assert matrix_snr(3 * w) == pytest.approx(matrix_snr(w) / 3, rel=1e-5)
    assert matrix_snr(w.T) == pytest.approx(matrix_snr(w), rel=1e-5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(256, 128), (128, 128)])
def test_low_rank_signal_beats_pure_noise_at_equal_norm(seed, shape):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(*shape, generator=g)
    signal = torch.randn(shape[0], 4, generator=g) @ torch.randn(4, shape[1], generator=g) * 9 / shape[1] ** 0.5
    structured = noise + signal
    unit = lambda m: m / torch.linalg.matrix_norm(m, 2)  # noqa: E731 - same max singular value
    assert matrix_snr(unit(structured)) > 1.05 * matrix_snr(unit(noise))


def test_degenerate_matrices():
    assert matrix_snr(torch.zeros(8, 4)) == 0.0  # no signal at all
    # All singular values equal: IQR 0, edge 0, nothing is noise -> inf (as the reference)
    assert matrix_snr(torch.eye(6)) == math.inf
    with pytest.raises(ValueError, match="2-D"):
        matrix_snr(torch.ones(3))


# ------------------------------------------------------------------ selection

NAMES = [f"model.layers.{i}.{t}" for i in range(10) for t in ("self_attn.q_proj", "mlp.down_proj")]


@pytest.mark.parametrize(
    ("n", "threshold", "expected"),
    [
        (30, 0.5, 15),
        (30, 0.7, 9),
        (30, 0.9, 3),  # 30 * 0.1 is 2.9999999999999996 in floating point
        (30, 0.0, 30),
        (30, 0.99, 1),  # at least one per type below 1
        (2, 0.5, 1),
        (1, 0.9, 1),
        (30, 1.0, 0),
        (0, 0.5, 0),
    ],
)
def test_keep_count(n, threshold, expected):
    assert keep_count(n, threshold) == expected


def test_select_modules_ranks_within_each_type():
    # q_proj SNR grows with the layer; down_proj SNR falls with it, on a different scale
    snrs = {}
    for name in NAMES:
        i = layer_index(name)
        snrs[name] = float(i) if "q_proj" in name else 100.0 - i
    chosen = select_modules(snrs, 0.7)
    assert chosen == {f"model.layers.{i}.self_attn.q_proj" for i in (7, 8, 9)} | {
        f"model.layers.{i}.mlp.down_proj" for i in (0, 1, 2)
    }
    assert len(select_modules(snrs, 0.0)) == len(NAMES)
    assert select_modules(snrs, 1.0) == set()


def test_select_modules_breaks_ties_by_name():
    snrs = dict.fromkeys(NAMES, 1.0)
    assert select_modules(snrs, 0.8) == select_modules(dict(reversed(list(snrs.items()))), 0.8)
    assert len(select_modules(snrs, 0.8)) == 4


def test_select_layers_and_its_error():
    assert select_layers(NAMES, [0, 9]) == {n for n in NAMES if layer_index(n) in (0, 9)}
    with pytest.raises(ConfigError) as err:
        select_layers(NAMES, [3, 10, 12])
    message = str(err.value)
    assert message.startswith("fine_tuning.spectrum.layers_to_finetune: layers 10, 12 do not exist")
    assert "10 layers, indices 0-9" in message


@pytest.mark.parametrize(
    ("name", "kind", "layer"),
    [
        ("model.layers.3.self_attn.q_proj", "self_attn.q_proj", 3),
        ("transformer.h.11.mlp.c_fc", "mlp.c_fc", 11),
        ("lm_head", "lm_head", None),
    ],
)
def test_module_type_and_layer(name, kind, layer):
    assert module_type(name) == kind
    assert layer_index(name) == layer
