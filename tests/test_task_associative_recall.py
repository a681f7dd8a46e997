"""Associative recall against its definition (Ba et al. 2016; MQAR of Arora et al. 2023)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rnnlab.config import ConfigError
from rnnlab.tasks import AssociativeRecall

K = V = 8  # keys 0 … 7, values 8 … 15 (value index j is token 8 + j), blank 16
BLANK = K + V


def sample(n=256, seed=0, **options):
    task = AssociativeRecall(**{"seq_len": 20, "num_pairs": 3, "num_keys": K, "num_values": V,
                                **options})
    batch = task.generate(n, torch.Generator().manual_seed(seed))
    return task, batch["x"].argmax(-1), batch["y"]


def pairs_of(row: list[int], n: int) -> dict[int, int]:
    return {row[2 * i]: row[2 * i + 1] - K for i in range(n)}


def test_associative_recall_starts_with_distinct_keys_and_distinct_values_in_pairs():
    _, tokens, _ = sample()
    for row in tokens.tolist():
        keys, values = row[0:6:2], row[1:6:2]
        assert all(0 <= k < K for k in keys) and len(set(keys)) == 3
        assert all(K <= v < K + V for v in values) and len(set(values)) == 3


def test_single_query_is_a_stored_key_at_the_last_step_after_blanks():
    _, tokens, _ = sample()
    for row in tokens.tolist():
        assert row[6:-1] == [BLANK] * 13
        assert row[-1] in row[0:6:2]


def test_single_query_target_is_the_value_stored_with_the_query_key():
    _, tokens, y = sample()
    assert y.shape == (256, 1) and y.dtype == torch.long
    for row, target in zip(tokens.tolist(), y[:, 0].tolist()):
        assert target == pairs_of(row, 3)[row[-1]]


def test_single_query_asks_each_pair_equally_often():
    _, tokens, _ = sample(n=30_000)
    asked = (tokens[:, 0:6:2] == tokens[:, -1:]).double().mean(0)
    assert torch.allclose(asked, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01)


def test_multi_query_asks_every_key_once_at_even_offsets_with_its_value_as_target():
    task, tokens, y = sample(multi_query=True, seq_len=24)
    assert task.n_out == 18 and y.shape == (256, 18)
    for row, target in zip(tokens.tolist(), y.tolist()):
        pairs, region = pairs_of(row, 3), row[6:]
        asked = [(offset, token) for offset, token in enumerate(region) if token != BLANK]
        assert sorted(token for _, token in asked) == sorted(pairs)
        assert all(offset % 2 == 0 for offset, _ in asked)
        expected = [-100] * 18
        for offset, key in asked:
            expected[offset] = pairs[key]
        assert target == expected


def test_multi_query_gaps_follow_the_power_law():
    # One pair: a single query at offset 2g with P(g) = (g + 1)^(a − 1) / Σ.
    for power_a in (0.01, 0.5, 1.0):
        _, tokens, _ = sample(n=40_000, multi_query=True, seq_len=12, num_pairs=1,
                              power_a=power_a)
        gap = (tokens[:, 2:] != BLANK).nonzero()[:, 1] // 2
        frequency = torch.bincount(gap, minlength=5).double() / 40_000
        weight = torch.arange(1, 6, dtype=torch.float64) ** (power_a - 1)
        assert torch.allclose(frequency, weight / weight.sum(), atol=0.01), power_a


@pytest.mark.parametrize("multi_query", [False, True])
def test_associative_recall_baseline_matches_the_best_memoryless_predictor(multi_query):
    # Without the pairs, a memoryless predictor knows the query key only: the best guess is the
    # empirical distribution of the answer given that key.
    task, tokens, y = sample(n=40_000, seed=1, multi_query=multi_query, seq_len=24)
    query = tokens[:, -task.n_out:][y != -100]
    answer = y[y != -100]
    counts = F.one_hot(query * V + answer, K * V).double().sum(0).view(K, V)
    probability = counts / counts.sum(1, keepdim=True)
    loss = -probability[query, answer].log().mean().item()
    assert task.baseline == math.log(V)
    assert abs(loss - task.baseline) / task.baseline < 0.01


def test_associative_recall_accuracy_ignores_unread_steps():
    y = torch.tensor([[-100, 2, -100, 5], [1, -100, -100, -100]])
    logits = F.one_hot(torch.tensor([[0, 2, 0, 4], [1, 0, 0, 0]]), V).float()
    task = AssociativeRecall(seq_len=12, num_pairs=2, multi_query=True)
    assert task.metrics(logits, y)["accuracy"].item() == pytest.approx(2 / 3)


def test_associative_recall_generates_t_10000_in_one_batch():
    for multi_query in (False, True):
        task, tokens, y = sample(n=2, seq_len=10_000, num_pairs=8, multi_query=multi_query)
        assert tokens.shape == (2, 10_000) and y.shape == (2, task.n_out)
        assert (y != -100).sum() == (16 if multi_query else 2)


@pytest.mark.parametrize(("options", "message"), [
    ({"seq_len": 10, "num_pairs": 5}, "task.num_pairs must be at most (task.seq_len − 1) / 2 = 4"),
    ({"seq_len": 12, "num_pairs": 4, "multi_query": True},
     "task.num_pairs must be at most task.seq_len / 4 = 3"),
    ({"num_pairs": 4, "num_keys": 3}, "task.num_keys must be an integer >= max(task.num_pairs, 2)"),
    ({"num_values": 1}, "task.num_values must be an integer >= max(task.num_pairs, 2)"),
    ({"power_a": 0}, "task.power_a must be a number in (0, 1]"),
    ({"multi_query": "yes"}, "task.multi_query must be true or false"),
])
def test_associative_recall_rejects_options_that_do_not_fit(options, message):
    with pytest.raises(ConfigError) as error:
        AssociativeRecall(**options)
    assert message in str(error.value)
    assert f"(set {message.split()[0]}=...)" in str(error.value)
