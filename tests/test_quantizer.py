"""The EMA quantizer against DESIGN.md's formulas, computed independently here."""

import torch

from tokenizer.quantizer import EMAQuantizer


def _quantizer(k=8, d=4, **kw):
    q = EMAQuantizer(k, d, **kw)
    q.train()
    return q


def test_nearest_matches_cdist_argmin():
    torch.manual_seed(0)
    q = _quantizer(512, 64)
    z = torch.randn(4096, 64)
    expected = torch.cdist(z.double(), q.codebook.double()).argmin(1)
    assert torch.equal(q.nearest(z), expected)


def test_nearest_under_bf16_autocast_is_float32():
    torch.manual_seed(1)
    q = _quantizer(256, 32).eval()
    z = torch.randn(2, 32, 16, 16)
    zb = z.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(zb)  # bf16 encoder output; distances must still be float32
    zb = zb.float()  # bf16 values are exact in float32
    expected = torch.cdist(zb.permute(0, 2, 3, 1).reshape(-1, 32).double(), q.codebook.double()).argmin(1)
    assert torch.equal(out.indices.flatten(), expected)


def test_one_ema_step_matches_formula_by_hand():
    k, d, g, eps = 3, 2, 0.9, 1e-5
    q = _quantizer(k, d, decay=g, eps=eps, dead_threshold=0.0)
    codebook = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    count0 = torch.tensor([2.0, 3.0, 1.0])
    sum0 = codebook * count0[:, None]
    q.codebook.copy_(codebook)
    q.ema_count.copy_(count0)
    q.ema_sum.copy_(sum0)
    q.initialized.fill_(True)
    vectors = torch.tensor([[1.0, 1.0], [9.0, 1.0], [11.0, -1.0], [0.5, -0.5]])  # -> codes 0, 1, 1, 0
    q(vectors.T.reshape(1, d, 1, 4).contiguous())
    # By hand: n = [2, 2, 0], sums = [[1.5, .5], [20, 0], [0, 0]].
    n_k = [2.0, 2.0, 0.0]
    s_k = [[1.5, 0.5], [20.0, 0.0], [0.0, 0.0]]
    N = [g * count0[i].item() + (1 - g) * n_k[i] for i in range(k)]
    m = [[g * sum0[i, j].item() + (1 - g) * s_k[i][j] for j in range(d)] for i in range(k)]
    total = sum(N)
    smoothed = [(N[i] + eps) / (total + k * eps) * total for i in range(k)]
    e = [[m[i][j] / smoothed[i] for j in range(d)] for i in range(k)]
    assert torch.allclose(q.ema_count, torch.tensor(N), atol=1e-6)
    assert torch.allclose(q.ema_sum, torch.tensor(m), atol=1e-6)
    assert torch.allclose(q.codebook, torch.tensor(e), atol=1e-6)


def test_dead_code_is_restarted_to_a_batch_vector_and_then_used():
    torch.manual_seed(0)
    q = _quantizer(4, 2, decay=0.99, dead_threshold=1.0)
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]))  # code 3 is far away
    q.ema_count.copy_(torch.tensor([10.0, 10.0, 10.0, 1.0]))  # code 3 is just alive
    q.ema_sum.copy_(q.codebook * q.ema_count[:, None])
    q.initialized.fill_(True)
    z = torch.rand(1, 2, 8, 8)  # every vector is near codes 0-2
    out = q(z)
    assert out.counts[3] == 0 and out.restarted == 1  # 0.99 * 1 < 1: dead, restarted
    batch_vectors = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert (batch_vectors == q.codebook[3]).all(1).any(), "restarted code is a vector of the batch"
    assert q.ema_count[3] == 1.0 and torch.equal(q.ema_sum[3], q.codebook[3] * 1.0), "statistics reset with it"
    out2 = q(z)
    assert out2.counts[3] > 0, "the restarted code is used on the next step"


def test_init_from_data_draws_distinct_batch_vectors():
    q = _quantizer(16, 3, kmeans_iters=0)
    flat = torch.randn(128, 3)
    q.init_from_data(flat)
    assert bool(q.initialized)
    matches = (q.codebook[:, None, :] == flat[None]).all(-1)  # (K, N)
    assert matches.any(1).all(), "every code is a vector of the batch"
    assert len({tuple(r.tolist()) for r in q.codebook}) == 16, "drawn without replacement"
    assert q.ema_count.sum() == 128  # statistics on the scale of one batch


def test_eval_mode_leaves_every_buffer_unchanged():
    q = _quantizer(32, 4)
    q(torch.randn(2, 4, 8, 8))  # initialise and update once in training mode
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.eval()
    for _ in range(3):
        q(torch.randn(2, 4, 8, 8) * 5)
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_straight_through_gradient_and_commitment_loss():
    q = _quantizer(8, 4, beta=0.25)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    out.quantized.sum().backward()
    assert torch.allclose(z.grad, torch.ones_like(z))  # identity gradient through the quantizer
    codes = out.quantized.detach()
    assert torch.allclose(out.loss, 0.25 * ((z.detach() - codes) ** 2).mean(), atol=1e-6)


def test_l2_codes_pick_the_largest_cosine_through_the_projection():
    torch.manual_seed(2)
    q = EMAQuantizer(128, 32, codebook_dim=8, l2_codes=True, kmeans_iters=2).train()
    z = torch.randn(4, 32, 6, 6) * 3
    out = q(z)  # initialises and updates: the codebook must stay on the unit sphere
    assert torch.allclose(q.codebook.norm(dim=1), torch.ones(128), atol=1e-5)
    q.eval()
    idx = q(z).indices.flatten()
    rows = torch.nn.functional.normalize(q.project_in(z).permute(0, 2, 3, 1).reshape(-1, 8).double(), dim=1)
    brute = (rows @ q.codebook.double().T).argmax(1)  # largest cosine, computed independently
    assert torch.equal(idx, brute)
    assert out.quantized.shape == z.shape, "projected back to the encoder's width"
    with torch.no_grad():
        assert torch.equal(q.lookup(idx.view(4, 6, 6)), q(z).quantized), "decode sees what forward quantized"


def test_rotation_trick_forward_is_the_code_and_its_gradient_is_the_rotation():
    from tokenizer.quantizer import rotate_to

    torch.manual_seed(3)
    z = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    e = torch.randn(5, 4, dtype=torch.float64)
    out = rotate_to(z, e)
    assert torch.allclose(out, e, atol=1e-12)
    g = torch.randn(5, 4, dtype=torch.float64)
    (out * g).sum().backward()
    for i in range(5):  # the paper's matrix, built by hand: s (I - 2 w w^T + 2 e_hat z_hat^T)
        zi, ei = z[i].detach(), e[i]
        z_hat, e_hat = zi / zi.norm(), ei / ei.norm()
        w = (z_hat + e_hat) / (z_hat + e_hat).norm()
        rot = torch.eye(4, dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(e_hat, z_hat)
        assert torch.allclose(rot @ z_hat, e_hat, atol=1e-12)
        expected = (ei.norm() / zi.norm()) * rot.T @ g[i]
        assert torch.allclose(z.grad[i], expected, atol=1e-10)
    assert not torch.allclose(z.grad, g), "unlike straight-through, the gradient is not copied"


def test_window_usage_counts_codes_used_by_recent_batches():
    q = _quantizer(8, 2, dead_threshold=0.0, usage_window=2)
    q.codebook.copy_(torch.tensor([[float(i), 0.0] for i in range(8)]))
    q.initialized.fill_(True)
    q.ema_count.fill_(1.0)
    q.ema_sum.copy_(q.codebook)
    batch = lambda codes: torch.tensor([[float(c), 0.0] for c in codes]).T.reshape(1, 2, 1, -1)  # noqa: E731
    assert q(batch([0, 1])).window_usage == 2 / 8
    assert q(batch([2, 3])).window_usage == 4 / 8
    assert q(batch([4, 4])).window_usage == 3 / 8, "codes 0 and 1 fell out of the 2-batch window"
