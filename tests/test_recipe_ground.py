"""The grounding fine-tune's loss terms (recipes/digits/ground.py): A_v^0 indexing, the answer row's
gradient-weighted attention, and the two ranking terms."""

from __future__ import annotations

import torch

from recipes.digits.ground import align_loss, answer_cam, follow_loss, ground_loss, visual_attention0


def test_visual_attention0_is_head_and_row_mean_over_the_visual_block():
    b, h, n = 2, 3, 12
    attn = torch.rand(b, h, n, n)
    sink, n_vis = 1, 4  # visual tokens at positions 2..5
    spans = [(7, 9), (7, 10)]
    got = visual_attention0(attn, sink, spans, n_vis)
    assert got.shape == (b, n_vis)
    for i, (s, e) in enumerate(spans):
        want = torch.stack([attn[i, :, r, 2:6] for r in range(s, e)]).mean((0, 1))
        assert torch.allclose(got[i], want)


def test_answer_cam_is_positive_part_of_attention_times_gradient_at_the_answer_row():
    torch.manual_seed(0)
    b, h, n, sink, n_vis = 2, 2, 9, 0, 4
    logits = [torch.randn(b, h, n, n, requires_grad=True) for _ in range(3)]
    attns = tuple(x.softmax(-1) for x in logits)
    weights = [torch.randn(b, h, n, n) for _ in range(3)]
    logit = sum((a * w).sum((1, 2, 3)) for a, w in zip(attns, weights, strict=True))  # d logit / d A^l = w_l
    t, raw = answer_cam(attns, logit, sink, n_vis, row=-3, graph=True)
    vis = slice(1, 1 + n_vis)
    want = sum((attns[l][:, :, -3, vis] * weights[l][:, :, -3, vis]).clamp(min=0).mean(1) for l in (1, 2))
    want_raw = sum((attns[l][:, :, -3, vis] * weights[l][:, :, -3, vis]).mean(1) for l in (1, 2))
    assert torch.allclose(t, want.detach(), atol=1e-6) and not t.requires_grad  # layer 0 is not part of T
    assert torch.allclose(raw, want_raw, atol=1e-6) and raw.requires_grad
    t2, none = answer_cam(attns, logit, sink, n_vis)
    assert none is None and torch.equal(t, t2)


def test_align_loss_rewards_the_target_order_and_reports_topk_recall():
    target = torch.tensor([[8.0, 7, 6, 5, 4, 3, 2, 1]])  # top 25% = tokens 0, 1
    same = torch.tensor([[0.30, 0.25, 0.15, 0.1, 0.08, 0.06, 0.04, 0.02]])
    reverse = same.flip(-1)
    loss_same, rec_same = align_loss(same, target)
    loss_rev, rec_rev = align_loss(reverse, target)
    assert rec_same.tolist() == [1.0] and rec_rev.tolist() == [0.0]
    assert loss_same < loss_rev
    half = torch.tensor([[0.30, 0.01, 0.25, 0.1, 0.08, 0.06, 0.04, 0.02]])
    assert align_loss(half, target)[1].tolist() == [0.5]


def test_follow_loss_pushes_the_attended_tokens_up_and_the_rest_down():
    a0 = torch.tensor([[0.05, 0.4, 0.05, 0.3, 0.05, 0.05, 0.05, 0.05]])  # top 25% = tokens 1, 3
    raw = torch.zeros(1, 8, requires_grad=True)
    follow_loss(raw, a0).backward()
    g = raw.grad[0]
    assert (g[[1, 3]] < 0).all() and (g[[0, 2, 4, 5, 6, 7]] > 0).all()
    agree = torch.tensor([[0.0, 5, 0, 5, 0, 0, 0, 0]])
    disagree = torch.tensor([[5.0, 0, 5, 0, 0, 0, 0, 0]])
    assert follow_loss(agree, a0) < follow_loss(disagree, a0)


def test_ground_loss_is_minus_log_region_share():
    a0 = torch.tensor([[1.0, 1.0, 2.0], [3.0, 1.0, 0.0]])
    region = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    loss, share = ground_loss(a0, region)
    torch.testing.assert_close(share, torch.tensor([0.5, 0.75]))
    torch.testing.assert_close(loss, -(torch.log(torch.tensor(0.5 + 1e-6)) + torch.log(torch.tensor(0.75 + 1e-6))) / 2)


def test_count_ratio_loss_is_minimal_at_the_exact_split_that_encodes_the_count():
    from recipes.digits.questions import count_ratio_loss

    L, sink = 12, 1
    region = torch.zeros(2, L, dtype=torch.bool)
    region[0, 2:6] = True  # one cell (4 tokens): k = 1
    region[1, 2:10] = True  # two cells: k = 2
    heads = ((0, 0, 4.0),)

    def loss(attn_row: torch.Tensor) -> float:
        a = torch.zeros(2, 1, L, L)
        a[:, 0, -3] = attn_row
        return float(count_ratio_loss((a,), {"region": region, "sink": sink}, heads))

    exact = region.float() / (region.sum(-1, keepdim=True) + 4.0)
    exact[:, sink] = 4.0 / (region.sum(-1) + 4.0)
    assert exact[0, sink] == 0.5 and abs(float(exact[1, sink]) - 1 / 3) < 1e-6  # share on the sink = 1 / (k + 1)
    # one cell attended only (the region-mass term of aux_attention_loss is already perfect there) costs more
    one_cell = torch.zeros(2, L)
    one_cell[:, 2:6] = 0.25
    too_much_sink = 0.9 * exact.clone()
    too_much_sink[:, sink] += 0.1
    best = loss(exact)
    assert best < loss(one_cell) and best < loss(too_much_sink)
    for noise in range(3):  # any other distribution costs more (Gibbs' inequality)
        other = torch.softmax(torch.randn(2, L, generator=torch.Generator().manual_seed(noise)), -1)
        assert best < loss(other)


def test_cell_corners_are_the_last_token_of_each_region_cell_in_every_frame():
    from recipes.digits.questions import cell_corners, cell_mask

    side, sink = 4, 1  # a 2 x 2-cell board: 4 x 4 tokens; visual tokens start after the sink
    cells = [(0, 0, 1), (1, 1, 0), (1, 1, 1)]  # (frame, row, col): two adjacent cells in frame 1
    region = torch.zeros(1, sink + 1 + 2 * side * side + 3, dtype=torch.bool)
    region[0, sink + 1: sink + 1 + 2 * side * side] = cell_mask(2, side, 2, cells)
    corners = cell_corners({"region": region, "sink": sink, "side": side})
    expected = [sink + 1 + f * side * side + (2 * r + 1) * side + 2 * c + 1 for f, r, c in cells]
    assert torch.nonzero(corners[0]).flatten().tolist() == expected
