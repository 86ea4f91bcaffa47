"""The Medusa loss: head i at position t is scored against token t+2+i, only where that token is labelled."""

import torch
import torch.nn.functional as F

from medusa_forge.drafts.fused_ce import summarise_head_stats
from medusa_forge.drafts.medusa_heads import MedusaConfig, MedusaHeads
from medusa_forge.drafts.medusa_training import head_weights, medusa_loss


def make_heads(num_heads=3, hidden=8, vocab=11):
    torch.manual_seed(0)
    heads = MedusaHeads(MedusaConfig(num_heads, 1, hidden, vocab, "x"))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_()
    return heads


def brute_force(heads, hidden, labels, weights):
    total, per_head = 0.0, []
    for i, head in enumerate(heads):
        losses = []
        for b in range(labels.shape[0]):
            for t in range(labels.shape[1] - 2 - i):
                target = labels[b, t + 2 + i]
                if target != -100:
                    losses.append(F.cross_entropy(head(hidden[b, t])[None], target[None]))
        mean = torch.stack(losses).mean()
        per_head.append(mean)
        total = total + weights[i] * mean
    return total, per_head


def test_loss_matches_brute_force_shift_and_mask():
    heads = make_heads()
    hidden = torch.randn(2, 10, 8)
    labels = torch.randint(0, 11, (2, 10))
    labels[0, :4] = -100  # a "user turn"
    labels[1, 7:] = -100  # padding
    weights = head_weights(3, 0.8)
    assert weights == [1.0, 0.8, 0.8**2]
    out = medusa_loss(heads, hidden, labels, weights)
    expected, per_head = brute_force(heads, hidden, labels, weights)
    torch.testing.assert_close(out["loss"], expected)
    summary = summarise_head_stats(out["head_stats"], "medusa")
    for i, value in enumerate(per_head):
        assert abs(summary[f"medusa{i}_loss"] - float(value.detach())) < 1e-5


def test_topk_counts_hits_at_the_shifted_position():
    heads = make_heads(num_heads=2)
    hidden = torch.randn(1, 6, 8)
    # make the labels exactly each head's argmax at the right shift -> top1 = 1 for head 0 only
    with torch.no_grad():
        preds0 = heads[0](hidden[0]).argmax(-1)
    labels = torch.full((1, 6), -100)
    labels[0, 2:] = preds0[:4]
    summary = summarise_head_stats(medusa_loss(heads, hidden, labels, [1.0, 1.0])["head_stats"], "medusa")
    assert summary["medusa0_top1"] == 1.0
    assert summary["medusa0_top5"] == 1.0


def test_no_labelled_target_gives_zero_loss_but_keeps_gradients_defined():
    heads = make_heads()
    hidden = torch.randn(1, 5, 8)
    labels = torch.full((1, 5), -100)
    out = medusa_loss(heads, hidden, labels, [1.0] * 3)
    assert float(out["loss"].detach()) == 0.0
    out["loss"].backward()
    assert all(p.grad is not None for p in heads.parameters())


def test_soft_labels_match_brute_force_against_the_base_distribution():
    heads = make_heads(num_heads=2)
    hidden = torch.randn(2, 9, 8)
    labels = torch.randint(0, 11, (2, 9))
    labels[1, :3] = -100
    lm_head = torch.randn(11, 8)
    out = medusa_loss(heads, hidden, labels, [1.0, 0.5], soft_target_weight=lm_head, chunk_size=3)
    expected = 0.0
    for i, head in enumerate(heads):
        terms = []
        for b in range(2):
            for t in range(9 - 2 - i):
                if labels[b, t + 2 + i] != -100:
                    target = F.softmax(hidden[b, t + 1 + i] @ lm_head.T, dim=-1)  # base's view of token t+2+i
                    terms.append(-(target * F.log_softmax(head(hidden[b, t]), dim=-1)).sum())
        expected = expected + [1.0, 0.5][i] * torch.stack(terms).mean()
    torch.testing.assert_close(out["loss"], expected)


def test_chunking_and_frozen_projection_give_the_same_loss_and_block_gradients():
    heads = make_heads()
    hidden = torch.randn(3, 12, 8)
    labels = torch.randint(0, 11, (3, 12))
    results = []
    for chunk_size, frozen in ((4096, False), (5, False), (5, True)):
        for p in heads.parameters():
            p.grad = None
        for head in heads:
            head[-1].weight.requires_grad_(not frozen)
        out = medusa_loss(heads, hidden, labels, [1.0] * 3, chunk_size=chunk_size)
        out["loss"].backward()
        results.append((out["loss"].detach(), heads[1][0].linear.weight.grad.clone(), heads[1][-1].weight.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    torch.testing.assert_close(results[0][1], results[2][1])
    torch.testing.assert_close(results[0][2], results[1][2])
    assert results[2][2] is None  # frozen projection: no weight gradient computed


def test_draft_vocabulary_learns_only_low_ids_and_counts_the_rest_as_misses():
    heads = make_heads(num_heads=1, vocab=11)
    hidden = torch.randn(1, 8, 8)
    labels = torch.tensor([[-100, -100, 1, 2, 9, 10, 3, 4]])  # two targets outside a draft vocab of 6
    out = medusa_loss(heads, hidden, labels, [1.0], draft_vocab_size=6)
    in_vocab = [(t, labels[0, t + 2]) for t in range(6) if 0 <= labels[0, t + 2] < 6]
    expected = torch.stack([F.cross_entropy(heads[0](hidden[0, t])[:6][None], y[None]) for t, y in in_vocab]).mean()
    torch.testing.assert_close(out["loss"], expected)
    stats = out["head_stats"][0]
    assert (float(stats[1]), float(stats[2])) == (4.0, 6.0)  # 4 tokens in the loss, 6 scored for top-k
    out["loss"].backward()
    assert heads[0][-1].weight.grad[6:].abs().sum() == 0  # rows outside the draft vocabulary never move
