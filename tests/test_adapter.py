"""Guided adapter: group reductions, cell-restricted attention and the voxel-guided view ensemble."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from peft_any2point.adapter import GuidedAdapter, LocalGeometry, group_max, group_mean


def make_adapter(**overrides: object) -> GuidedAdapter:
    torch.manual_seed(0)
    values = {
        "hidden_size": 8,
        "bottleneck": 4,
        "scale": 0.5,
        "dropout": 0.0,
        "use_local_guidance": True,
        "use_view_ensemble": True,
        "local_scale": 0.5,
    }
    values.update(overrides)
    adapter = GuidedAdapter(**values).eval()
    torch.nn.init.normal_(adapter.up.weight)  # a trained adapter; a fresh one is the identity
    return adapter


# Two views of four tokens: token 3 shares a cell with token 0 in neither view.
CELLS = torch.tensor([[[0, 0, 1, 1], [0, 1, 0, 1]]])  # (B=1, V=2, T=4)
CENTRES = torch.tensor([[[0.0, 0.0, 0.0], [0.01, 0.0, 0.0], [0.5, 0.5, 0.5], [0.9, 0.9, 0.9]]])


def test_geometry_groups_match_brute_force():
    geometry = LocalGeometry.from_projection(CELLS, CENTRES, voxel_size=0.1)
    for v in range(2):
        for i in range(4):
            first_of_cell = min(j for j in range(4) if CELLS[0, v, j] == CELLS[0, v, i])
            assert geometry.cell_groups[0, v, i] == first_of_cell
            for j in range(4):
                expected_bias = 0.0 if CELLS[0, v, i] == CELLS[0, v, j] else float("-inf")
                assert geometry.cell_bias[0, v, i, j] == expected_bias
    # tokens 0 and 1 share a voxel, 2 and 3 are alone
    assert geometry.voxel_groups.tolist() == [[0, 0, 2, 3]]
    values = torch.randn(1, 4, 3)
    expected_mean = torch.stack([values[0, :2].mean(0), values[0, :2].mean(0), values[0, 2], values[0, 3]])
    torch.testing.assert_close(group_mean(values, geometry.voxel_groups)[0], expected_mean)
    expected_max = torch.stack([values[0, :2].amax(0), values[0, :2].amax(0), values[0, 2], values[0, 3]])
    assert torch.equal(group_max(values, geometry.voxel_groups)[0], expected_max)


def test_group_mean_matches_averaging_matrix():
    """Per-view groups of random ids: the scatter mean equals multiplying by the row-normalised adjacency."""
    torch.manual_seed(0)
    ids = torch.randint(0, 5, (3, 2, 16))  # (B, V, T)
    same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)).double()
    groups = same.argmax(-1)
    values = torch.randn(3, 2, 16, 4, dtype=torch.float64)
    torch.testing.assert_close(group_mean(values, groups), (same / same.sum(-1, keepdim=True)) @ values)


def test_fresh_adapter_is_the_identity():
    adapter = GuidedAdapter(8, 4, 0.5, 0.1, True, True, 0.5).eval()
    hidden = torch.randn(2, 5, 8)
    geometry = LocalGeometry.from_projection(CELLS.expand(2, -1, -1), CENTRES.expand(2, -1, -1), 0.1)
    assert torch.equal(adapter(hidden, geometry), hidden)


def test_local_attention_stays_inside_cells():
    adapter = make_adapter(use_view_ensemble=False)
    geometry = LocalGeometry.from_projection(CELLS, CENTRES, voxel_size=0.1)
    tokens = torch.randn(1, 4, 4)
    changed = tokens.clone()
    changed[0, 3] += 10.0
    before, after = adapter.local_guidance(tokens, geometry), adapter.local_guidance(changed, geometry)
    torch.testing.assert_close(before[0, 0], after[0, 0])  # token 3 is in none of token 0's cells
    assert not torch.allclose(before[0, 1], after[0, 1])  # token 1 shares view 1's cell with token 3


def test_view_ensemble_matches_independent_computation():
    adapter = make_adapter()
    geometry = LocalGeometry.from_projection(CELLS, CENTRES, voxel_size=0.1)
    tokens = torch.randn(1, 4, 4)
    query, key, value = adapter.local_qkv(tokens).chunk(3, dim=-1)
    per_view = []
    for v in range(2):
        rows = []
        for i in range(4):
            members = [j for j in range(4) if CELLS[0, v, j] == CELLS[0, v, i]]
            outputs = []
            for m in members:  # attention of each cell member over its cell, then the cell mean
                scores = torch.stack([query[0, m] @ key[0, j] for j in members]) / 2.0
                outputs.append(scores.softmax(0) @ value[0, members])
            rows.append(torch.stack(outputs).mean(0))
        per_view.append(F.gelu(adapter.local_norm(torch.stack(rows))))
    per_view = torch.stack(per_view)  # (V, T, r)
    voxel_members = [[0, 1], [0, 1], [2], [3]]
    reference = torch.stack([tokens[0, m].amax(0) + tokens[0, m].mean(0) for m in voxel_members])
    weights = F.cosine_similarity(per_view, reference.unsqueeze(0), dim=-1).softmax(0)  # (V, T)
    expected = (weights.unsqueeze(-1) * per_view).sum(0)
    torch.testing.assert_close(adapter.local_guidance(tokens, geometry)[0], expected, rtol=1e-5, atol=1e-6)


def test_class_token_gets_no_local_guidance():
    guided, plain = make_adapter(), make_adapter(use_local_guidance=False)
    plain.load_state_dict(guided.state_dict(), strict=False)
    geometry = LocalGeometry.from_projection(CELLS, CENTRES, voxel_size=0.1)
    hidden = torch.randn(1, 5, 8)
    out_guided, out_plain = guided(hidden, geometry), plain(hidden, None)
    torch.testing.assert_close(out_guided[:, 0], out_plain[:, 0])
    assert not torch.allclose(out_guided[:, 1:], out_plain[:, 1:])
