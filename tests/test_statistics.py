import pytest
import torch

from adapter_service.statistics import mean_input_embedding


def test_padding_side_does_not_change_the_statistic() -> None:
    torch.manual_seed(0)
    table = torch.randn(50, 8)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    width = 6
    right = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    right_mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    left = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    left_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    a = mean_input_embedding(table, right, right_mask)
    b = mean_input_embedding(table, left, left_mask)
    assert torch.allclose(a, b, atol=1e-6)
    expected = torch.nn.functional.normalize(table[torch.tensor(prompts[0])].mean(0), dim=0)
    assert torch.allclose(a[0], expected, atol=1e-6)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2))


def test_rows_without_tokens_are_refused() -> None:
    with pytest.raises(ValueError, match="attention_mask: every row needs at least one prompt token"):
        mean_input_embedding(torch.randn(10, 4), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
