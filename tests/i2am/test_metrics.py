"""IMACS on hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from i2am import imacs

MAP = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
MASK = torch.tensor([[True, False], [False, True]])


def test_hand_computed():
    # normalised [[0, 1/3], [2/3, 1]]: inside mean (0 + 1)/2 = 0.5, outside (1/3 + 2/3)/2 = 0.5
    assert imacs(MAP, MASK).item() == pytest.approx(0.5 - 3 * 0.5)
    assert imacs(MAP, MASK, penalty=1.0).item() == pytest.approx(0.0)
    assert imacs(MAP, ~MASK).item() == pytest.approx(0.5 - 3 * 0.5)
    assert imacs(MAP * 7 + 5, MASK).item() == pytest.approx(-1.0)  # invariant to affine rescaling
    assert imacs(MAP, MASK).ndim == 0


def test_batched_resized_mask_and_constant_map():
    maps = torch.stack([MAP, torch.tensor([[4.0, 0.0], [0.0, 0.0]]), torch.full((2, 2), 3.0)])
    big = MASK.repeat_interleave(2, 0).repeat_interleave(2, 1).float()  # 4×4 {0,1} mask, resized nearest
    got = imacs(maps, big)
    # sample 2: normalised [[1, 0], [0, 0]] → inside 0.5, outside 0; sample 3 constant → all 0
    torch.testing.assert_close(got, torch.tensor([-1.0, 0.5, 0.0]))
    per_sample = torch.stack([MASK, MASK, MASK])
    torch.testing.assert_close(imacs(maps, per_sample), got)


def test_mask_must_split_the_grid():
    with pytest.raises(ValueError, match="inside and outside"):
        imacs(MAP, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="map must be"):
        imacs(torch.zeros(1, 1, 2, 2), MASK)
