"""Each RF-CLIP step against hand-built cases and independent references."""
import numpy as np
import pytest
import scipy.linalg
import torch

from rfclip_engine.steps import (
    attention_probs,
    bipartition,
    find_defocused_tokens,
    find_distraction_tokens,
    fiedler_vector,
    received_attention,
    redistribute_attention,
    redistribute_embeddings,
    top_eigenvector,
)

C = 64
DIMS = torch.tensor([3, 17, 40])


def clean_tokens(b=2, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, C, generator=g)  # every channel near the uniform share


def test_planted_spikes_found_exactly():
    x = clean_tokens()
    planted = torch.zeros(2, 12, dtype=torch.bool)
    planted[0, [1, 7]] = True
    planted[1, 4] = True
    x[0, 1, 3] = 200.0
    x[0, 7, 40] = 200.0
    x[1, 4, 17] = 200.0
    x[1, 5, 20] = 200.0  # a spike outside the distraction dimensions is not a distraction
    found = find_distraction_tokens(x, DIMS, sigma=5.0)
    assert torch.equal(found, planted)


def test_no_distraction_on_clean_tokens():
    assert not find_distraction_tokens(clean_tokens(), DIMS, sigma=5.0).any()


def test_sigma_threshold_is_strict_and_relative_to_width():
    # A token whose normalized weight on dim 3 is exactly sigma / C is not a distraction token;
    # a hair above, it is.
    sigma = 5.0
    x = torch.zeros(1, 2, C)
    x[..., :] = 1.0
    x[:, :, 0] = 0.0  # min 0, so p = x / sum(x)
    # p_3 = a / (a + 62) == sigma / C  <=>  a = 62 sigma / (C - sigma)
    a = 62 * sigma / (C - sigma)
    x[0, 0, 3] = a
    x[0, 1, 3] = a * 1.01
    found = find_distraction_tokens(x.double(), DIMS, sigma)
    assert found.tolist() == [[False, True]]
    # a larger sigma demands a larger peak
    assert not find_distraction_tokens(x, DIMS, sigma=10.0).any()


def test_reference_normalization_float64():
    x = clean_tokens(1, 30, seed=3) * 3 - 1
    x[0, ::4, 40] += torch.linspace(2, 30, 8)
    xs = x[0].double().numpy()
    shifted = xs - xs.min(axis=1, keepdims=True)
    p = shifted / shifted.sum(axis=1, keepdims=True)
    expected = p[:, DIMS.numpy()].max(axis=1) > 5.0 / C
    assert expected.any() and not expected.all()
    assert find_distraction_tokens(x, DIMS, 5.0)[0].numpy().tolist() == expected.tolist()


def test_attention_test_requires_both():
    x = clean_tokens(1, 4)
    x[0, [0, 1], 3] = 200.0
    share = torch.tensor([[0.5, 0.05, 0.5, 0.2]])
    found = find_distraction_tokens(x, DIMS, 5.0, attention_share=share, attention_threshold=0.1)
    assert found.tolist() == [[True, False, False, False]]


def test_received_attention_is_the_column_mean_over_patch_rows():
    attn = torch.softmax(torch.randn(2, 3, 5, 5, dtype=torch.float64), dim=-1)
    share = received_attention(attn)
    expected = attn[:, :, 1:, 1:].sum(dim=2).mean(dim=1) / 4
    torch.testing.assert_close(share, expected)


def test_embedding_redistribution_touches_only_distraction_cells():
    b, h, w = 1, 4, 5
    x = torch.randn(b, h * w, C, dtype=torch.float64)
    dis = torch.zeros(b, h * w, dtype=torch.bool)
    dis[0, [0, 7, 8, 19]] = True  # corner, interior neighbours, opposite corner
    out = redistribute_embeddings(x, dis, DIMS, (h, w))
    changed = out != x
    allowed = torch.zeros_like(changed)
    for i in dis[0].nonzero().flatten():
        allowed[0, i, DIMS] = True
    assert not (changed & ~allowed).any()
    grid = x[0].reshape(h, w, C)
    for i in dis[0].nonzero().flatten().tolist():
        r, c = divmod(i, w)
        rows = range(max(r - 1, 0), min(r + 2, h))
        cols = range(max(c - 1, 0), min(c + 2, w))
        cells = [grid[rr, cc] for rr in rows for cc in cols]  # unrepaired values, self included
        expected = torch.stack(cells).mean(dim=0)[DIMS]
        torch.testing.assert_close(out[0, i, DIMS], expected)


def test_embedding_redistribution_in_place_on_a_view_of_the_stream():
    stream = torch.randn(2, 1 + 12, C)
    dis = torch.zeros(2, 12, dtype=torch.bool)
    dis[0, [0, 5]] = True
    dis[1, 11] = True
    expected = redistribute_embeddings(stream[:, 1:], dis, DIMS, (3, 4))
    cls = stream[:, 0].clone()
    assert not torch.equal(expected, stream[:, 1:])
    redistribute_embeddings(stream[:, 1:], dis, DIMS, (3, 4), in_place=True)
    assert torch.equal(stream[:, 1:], expected) and torch.equal(stream[:, 0], cls)


def test_embedding_redistribution_no_distraction_is_identity():
    x = torch.randn(2, 12, C)
    out = redistribute_embeddings(x, torch.zeros(2, 12, dtype=torch.bool), DIMS, (3, 4))
    assert torch.equal(out, x)


def random_similarity(n, seed):
    rng = np.random.default_rng(seed)
    a = rng.random((n, n))
    return (a + a.T) / 2


@pytest.mark.parametrize("seed", range(5))
def test_fiedler_matches_scipy_generalized_eigenproblem(seed):
    w = random_similarity(40, seed) ** 4  # spread the spectrum
    d = np.diag(w.sum(axis=1))
    _, vecs = scipy.linalg.eigh(d - w, d)
    expected = vecs[:, 1]
    got = fiedler_vector(torch.from_numpy(w).unsqueeze(0))[0].double().numpy()
    cos = abs(got @ expected) / np.linalg.norm(got) / np.linalg.norm(expected)
    assert cos > 1 - 1e-4
    assert bipartition(torch.from_numpy(got)[None]).tolist() in (
        [(expected > expected.mean()).tolist()], [(-expected > -expected.mean()).tolist()])


def test_fiedler_recovers_planted_two_blocks_batched():
    rng = np.random.default_rng(0)
    mats, truths = [], []
    for n_fg in (7, 20):
        n = 30
        labels = np.zeros(n, bool)
        labels[rng.permutation(n)[:n_fg]] = True
        same = labels[:, None] == labels[None, :]
        w = np.where(same, 1.0, 0.05) + 0.01 * rng.random((n, n))
        mats.append((w + w.T) / 2)
        truths.append(labels)
    y = fiedler_vector(torch.tensor(np.stack(mats)))
    parts = bipartition(y).numpy()
    for part, truth in zip(parts, truths):
        assert (part == truth).all() or (part == ~truth).all()


def test_orientation_puts_largest_magnitude_token_in_foreground():
    y = torch.tensor([[0.1, 0.2, -0.9, 0.3, 0.2]])
    fg = bipartition(y)
    assert fg[0, 2] and fg.tolist() == [[False, False, True, False, False]]
    assert torch.equal(bipartition(-y), fg)
    # tie on |y|: the first index is the seed
    tie = torch.tensor([[0.5, -0.5, 0.0, 0.0]])
    assert bipartition(tie).tolist() == [[True, False, False, False]]


def test_defocused_excludes_distraction_and_falls_back():
    n = 6
    w = torch.full((1, n, n), 0.05)
    w[0, :3, :3] = 1.0
    w[0, 3:, 3:] = 1.0
    part = bipartition(fiedler_vector(w))[0]
    dis = part.clone().unsqueeze(0)  # every foreground token is a distraction: Def empty
    out, _ = find_defocused_tokens(w, dis)
    assert torch.equal(out, ~dis)
    dis2 = torch.zeros(1, n, dtype=torch.bool)
    fg_index = int(part.nonzero()[0])
    dis2[0, fg_index] = True
    out2, _ = find_defocused_tokens(w, dis2)
    expected = part.clone()
    expected[fg_index] = False
    assert torch.equal(out2[0], expected)


def make_attention(b=2, h=3, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, h, n + 1, n + 1, generator=g, dtype=torch.float64) * 2, dim=-1)


def masks(n=10):
    dis = torch.zeros(2, n, dtype=torch.bool)
    dfc = torch.zeros(2, n, dtype=torch.bool)
    dis[0, [1, 4]] = True
    dfc[0, [0, 2, 3, 7]] = True
    dis[1, 9] = True
    dfc[1, [5, 6]] = True
    return dis, dfc


def test_attention_redistribution_invariants():
    attn = make_attention()
    dis, dfc = masks()
    beta = 0.4
    out = redistribute_attention(attn, dis, dfc, beta)
    torch.testing.assert_close(out.sum(-1), torch.ones_like(out.sum(-1)))
    assert torch.equal(out[:, :, 0, :], attn[:, :, 0, :])  # CLS row
    assert torch.equal(out[:, :, :, 0], attn[:, :, :, 0])  # CLS column
    for b in range(2):
        d_cols = dis[b].nonzero().flatten() + 1
        f_cols = dfc[b].nonzero().flatten() + 1
        other = (~dis[b] & ~dfc[b]).nonzero().flatten() + 1
        torch.testing.assert_close(out[b, :, 1:][..., d_cols], (1 - beta) * attn[b, :, 1:][..., d_cols])
        assert torch.equal(out[b, :, 1:][..., other], attn[b, :, 1:][..., other])
        ratio_before = attn[b, :, 1:][..., f_cols] / attn[b, :, 1:][..., f_cols[:1]]
        ratio_after = out[b, :, 1:][..., f_cols] / out[b, :, 1:][..., f_cols[:1]]
        torch.testing.assert_close(ratio_after, ratio_before)
        # the defocused tokens gain exactly the removed budget
        gained = (out - attn)[b, :, 1:][..., f_cols].sum(-1)
        budget = beta * attn[b, :, 1:][..., d_cols].sum(-1)
        torch.testing.assert_close(gained, budget)


def test_attention_redistribution_beta_zero_and_empty_sets_are_identity():
    attn = make_attention()
    dis, dfc = masks()
    torch.testing.assert_close(redistribute_attention(attn, dis, dfc, 0.0), attn, rtol=0, atol=1e-15)
    empty = torch.zeros_like(dis)
    torch.testing.assert_close(redistribute_attention(attn, empty, dfc, 0.4), attn, rtol=0, atol=1e-15)
    assert torch.equal(redistribute_attention(attn, dis, empty, 0.4), attn)


def test_attention_probs_rows_sum_to_one():
    q, k = torch.randn(2, 2, 2, 5, 8).unbind(0)
    a = attention_probs(q, k)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 5))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
    torch.testing.assert_close(a, ref)


def test_attention_redistribution_in_place_writes_the_same_result():
    attn = make_attention()
    dis, dfc = masks()
    dfc[1] = False  # an item without defocused tokens keeps plain attention
    expected = redistribute_attention(attn, dis, dfc, 0.4)
    assert not torch.equal(expected[0], attn[0]) and torch.equal(expected[1], attn[1])
    buffer = attn.clone()
    got = redistribute_attention(buffer, dis, dfc, 0.4, in_place=True)
    assert got.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer, expected, rtol=0, atol=0)


def attention_like(n, seed, batch=1):
    """Row-softmax similarities like key-key attention, with a few token clusters."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(batch, 4, 16, generator=g)
    assign = torch.randint(0, 4, (batch, n), generator=g)
    keys = centers.gather(1, assign[..., None].expand(-1, -1, 16)) + 0.8 * torch.randn(batch, n, 16, generator=g)
    w = torch.softmax(keys @ keys.transpose(1, 2) / 4, dim=-1)
    return (w + w.transpose(1, 2)) / 2


@pytest.mark.parametrize("seed", range(6))
def test_lanczos_gives_the_exact_partition(seed):
    w = attention_like(196, seed, batch=3)
    exact = bipartition(fiedler_vector(w, "exact"))
    fast = bipartition(fiedler_vector(w, "lanczos"))
    assert torch.equal(fast, exact)
    # the random matrices checked against scipy have near-degenerate spectra (lambda2 and lambda3
    # within 3%, and a negative eigenvalue larger in magnitude)
    r = torch.from_numpy(random_similarity(60, seed) ** 4).unsqueeze(0)
    assert torch.equal(bipartition(fiedler_vector(r, "lanczos")), bipartition(fiedler_vector(r, "exact")))


@pytest.mark.parametrize("n", [3, 5, 16, 32, 33])
def test_lanczos_on_fewer_tokens_than_steps(n):
    """Small grids (a 4x4 crop has 16 tokens) leave fewer dimensions than the default 32 steps."""
    for seed in range(4):
        w = attention_like(n, seed, batch=3)
        assert torch.equal(bipartition(fiedler_vector(w, "lanczos")), bipartition(fiedler_vector(w, "exact")))


def test_lanczos_warm_start_across_a_running_mean():
    """As in the encoder: similarities accumulate block by block, each solve starts from the last."""
    total, start = None, None
    for block in range(11):
        w = attention_like(196, 100 + block, batch=2)
        total = w if total is None else total + w
        mean = total / (block + 1)
        start = fiedler_vector(mean, "lanczos", start)
        assert torch.equal(bipartition(start), bipartition(fiedler_vector(mean, "exact")))


def test_lanczos_recovers_planted_blocks():
    rng = np.random.default_rng(0)
    labels = np.zeros(50, bool)
    labels[rng.permutation(50)[:12]] = True
    w = np.where(labels[:, None] == labels[None, :], 1.0, 0.05) + 0.01 * rng.random((50, 50))
    part = bipartition(fiedler_vector(torch.tensor((w + w.T) / 2)[None], "lanczos"))[0].numpy()
    assert (part == labels).all() or (part == ~labels).all()


@pytest.mark.parametrize("gap", [0.3, 1e-3, 1e-5])
def test_top_eigenvector_by_squaring_equals_float64_eigh(gap):
    """Symmetric matrices with eigenvalues in [-1, 1] (as Ritz values of the normalized similarity
    are), the top two `gap` apart: the vector eigh gives in float64, without a host sync."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 32, 32, generator=g, dtype=torch.float64))
    values = torch.rand(4, 32, generator=g, dtype=torch.float64) * 1.6 - 1.0  # in [-1, 0.6]
    values[:, 0], values[:, 1] = 0.9, 0.9 - gap
    matrices = q @ torch.diag_embed(values) @ q.transpose(1, 2)
    found = top_eigenvector(matrices.float(), shift=1.0)
    expected = q[..., 0].float()
    cosine = (found * expected).sum(-1).abs()
    assert torch.all(cosine > 1 - 1e-4), cosine
