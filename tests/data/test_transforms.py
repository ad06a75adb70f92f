"""normalize_faces: the one uint8 -> model-input conversion (training, evaluation, benchmarks)."""

from __future__ import annotations

import pytest
import torch

from facems.data.transforms import normalize_faces


def test_normalize_faces_matches_a_per_image_reference() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 8, 10), dtype=torch.uint8, generator=g)
    flip = torch.tensor([True, False, False, True, True, False])
    out = normalize_faces(images, flip, channels_last=True)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    for i in range(images.shape[0]):
        pixels = images[i].double().tolist()  # [c][h][w] as Python numbers
        for c in range(3):
            for h in range(8):
                row = pixels[c][h][::-1] if flip[i] else pixels[c][h]
                expected = torch.tensor([2.0 * v / 255.0 - 1.0 for v in row], dtype=torch.float32)
                torch.testing.assert_close(out[i, c, h], expected, rtol=0, atol=1e-6)
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_normalize_faces_rejects_float_input_and_wrong_mask() -> None:
    with pytest.raises(ValueError, match="expected a uint8"):
        normalize_faces(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        normalize_faces(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.bool))


def test_normalize_faces_equals_insightface_arithmetic_to_the_bit() -> None:
    images = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    out = normalize_faces(images)
    expected = ((images.float() / 255) - 0.5) / 0.5  # insightface's evaluation, as written there
    assert torch.equal(out, expected)
    assert out.is_contiguous()
