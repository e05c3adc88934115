"""Pooling respects the attention mask: padding (left or right) never changes a text's vector."""

import pytest
import torch

from textcl.errors import TextclError
from textcl.model.pooling import POOLING_MODES, pool


def padded(tokens: torch.Tensor, total: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`[T, D]` real tokens -> `[1, total, D]` with random garbage at padded positions, and its mask."""
    length, dim = tokens.shape
    garbage = torch.randn(total - length, dim) * 100
    mask = torch.zeros(total, dtype=torch.long)
    if side == "right":
        out, mask[:length] = torch.cat([tokens, garbage]), 1
    else:
        out, mask[total - length :] = torch.cat([garbage, tokens]), 1
    return out.unsqueeze(0), mask.unsqueeze(0)


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_never_changes_the_pooled_vector(mode: str, side: str) -> None:
    torch.manual_seed(0)
    tokens = torch.randn(5, 8)
    alone = pool(tokens.unsqueeze(0), torch.ones(1, 5, dtype=torch.long), mode)
    batch, mask = padded(tokens, 9, side)
    assert torch.allclose(pool(batch, mask, mode), alone, atol=1e-6)


def test_modes_select_the_expected_tokens() -> None:
    tokens = torch.arange(12, dtype=torch.float32).view(1, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0]])
    assert pool(tokens, mask, "cls").tolist() == [[0, 1, 2]]
    assert pool(tokens, mask, "last_token").tolist() == [[6, 7, 8]]
    assert pool(tokens, mask, "max").tolist() == [[6, 7, 8]]
    assert pool(tokens, mask, "mean").tolist() == [[3, 4, 5]]
    expected = (1 * tokens[0, 0] + 2 * tokens[0, 1] + 3 * tokens[0, 2]) / 6
    assert torch.allclose(pool(tokens, mask, "weighted_mean")[0], expected)


def test_unknown_mode_names_the_valid_ones() -> None:
    with pytest.raises(TextclError, match="valid modes: mean, cls, max, last_token, weighted_mean"):
        pool(torch.zeros(1, 2, 3), torch.ones(1, 2), "avg")
