"""Float64 NumPy oracle for the divergence kernels (values and student-logit gradients).

Letters: N tokens, V vocabulary. Written independently of opsd_jax.kernels; its gradient is itself
checked against finite differences in test_oracle.py.
"""

from __future__ import annotations

import numpy as np


def _log_softmax(z_NxV):
    m_N = np.max(z_NxV, axis=-1, keepdims=True)
    m_N = np.where(np.isfinite(m_N), m_N, 0.0)
    with np.errstate(divide="ignore"):
        return z_NxV - m_N - np.log(np.sum(np.exp(z_NxV - m_N), axis=-1, keepdims=True))


def _plogq(p, x):
    """sum of p * x over entries with p > 0 (x may be +-inf where p == 0)."""
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * np.where(p > 0, x, 0.0), 0.0)


def scaled(logits_NxV, temperature, valid_vocab):
    z_NxV = np.asarray(logits_NxV, np.float64) / temperature
    if valid_vocab is not None:
        z_NxV = z_NxV.copy()
        z_NxV[:, valid_vocab:] = -np.inf
    return z_NxV


def _parts(student_NxV, teacher_NxV, beta, temperature, valid_vocab):
    ls = _log_softmax(scaled(student_NxV, temperature, valid_vocab))
    lt = _log_softmax(scaled(teacher_NxV, temperature, valid_vocab))
    ps, pt = np.exp(ls), np.exp(lt)
    lm = None
    if 0.0 < beta < 1.0:
        with np.errstate(divide="ignore"):
            lm = np.log(beta * pt + (1.0 - beta) * ps)
    return ls, lt, ps, pt, lm


def _divergence(ls, lt, ps, pt, lm, beta):
    """float64 [N] from both sides' log-probs and probs [N, V] and the mixture's log-probs lm:
    forward KL (beta 0), reverse KL (beta 1), else the generalized JSD."""
    with np.errstate(invalid="ignore"):
        if beta == 0.0:
            return _plogq(pt, lt - ls).sum(-1)
        if beta == 1.0:
            return _plogq(ps, ls - lt).sum(-1)
        return beta * _plogq(pt, lt - lm).sum(-1) + (1 - beta) * _plogq(ps, ls - lm).sum(-1)


def outputs(student_NxV, teacher_NxV, beta, temperature=1.0, mask=None, valid_vocab=None, targets=None):
    """dict of float64 [N]: divergence, student_entropy, teacher_entropy (+ logprobs with targets)."""
    ls, lt, ps, pt, lm = _parts(student_NxV, teacher_NxV, beta, temperature, valid_vocab)
    out = {
        "divergence": _divergence(ls, lt, ps, pt, lm, beta),
        "student_entropy": -_plogq(ps, ls).sum(-1),
        "teacher_entropy": -_plogq(pt, lt).sum(-1),
    }
    if targets is not None:
        idx = np.arange(ls.shape[0])
        out["student_logprob"] = ls[idx, targets]
        out["teacher_logprob"] = lt[idx, targets]
    if mask is not None:
        out = {k: np.where(mask, v, 0.0) for k, v in out.items()}
    return out


def student_grad(
    student_NxV, teacher_NxV, beta, cotangents, temperature=1.0, mask=None, valid_vocab=None, targets=None
):
    """Gradient of sum_k cotangents[k] . outputs[k] w.r.t. the raw student logits: float64 [N, V].

    cotangents: dict with float [N] entries for divergence, student_entropy and (with targets)
    student_logprob; teacher outputs carry no student gradient.
    """
    ls, lt, ps, pt, lm = _parts(student_NxV, teacher_NxV, beta, temperature, valid_vocab)
    vals = outputs(student_NxV, teacher_NxV, beta, temperature, None, valid_vocab, targets)
    n = ls.shape[0]
    with np.errstate(invalid="ignore"):
        if beta == 0.0:
            d = ps - pt
        elif beta == 1.0:
            d = _plogq(ps, ls - lt - vals["divergence"][:, None])
        else:
            kl_sm = _plogq(ps, ls - lm).sum(-1)
            d = (1 - beta) * _plogq(ps, ls - lm - kl_sm[:, None])
        g = cotangents["divergence"][:, None] * d
        g -= cotangents["student_entropy"][:, None] * _plogq(ps, ls + vals["student_entropy"][:, None])
    if targets is not None:
        onehot = np.zeros_like(ps)
        onehot[np.arange(n), targets] = 1.0
        g += cotangents["student_logprob"][:, None] * (onehot - ps)
    if mask is not None:
        g = np.where(np.asarray(mask)[:, None], g, 0.0)
    return g / temperature


def float32_gradient_atol(student_NxV, teacher_NxV, gradient_NxV, temperature=1.0, valid_vocab=None):
    """Absolute tolerance for a float32 student gradient against this oracle's float64 one.

    Float32 holds a log-prob of size L only to about L * eps, and every divergence gradient scales a
    log-prob difference by a probability and a cotangent: the attainable error grows with the
    largest |log-prob| in the batch, not only with the gradient's size. A fixed 2e-6 of the largest
    gradient failed about once in a thousand draws at beta 1 (true errors up to 0.42 of eps * (1 + L)
    * max|g| over 400 draws; the factor 4 leaves room), while a wrong formula errs by O(max|g|).
    """
    finite = []
    for logits in (student_NxV, teacher_NxV):
        ls = _log_softmax(scaled(logits, temperature, valid_vocab))
        finite.append(np.abs(ls[np.isfinite(ls)]).max())
    scale = max(1.0, float(np.abs(gradient_NxV).max()))
    return 4.0 * float(np.finfo(np.float32).eps) * (1.0 + max(finite)) * scale


def jsd_gradient_terms(student_NxV, teacher_NxV, beta):
    """(1 - beta) p_s |log(p_s / m)|, float64 [N, V]: the size of the two terms whose difference is
    the JSD's gradient at an entry, (1 - beta) p_s (log(p_s / m) - KL(p_s || m)). Float32 can only
    be asked to get that difference to a few epsilons of this size, however much of it cancels."""
    ls, _, ps, _, lm = _parts(student_NxV, teacher_NxV, beta, 1.0, None)
    return (1.0 - beta) * ps * np.abs(ls - lm)


def _topk_buckets(student_NxV, teacher_ids_NxK, teacher_logprobs_NxK, temperature, valid_vocab):
    """Student log-probs [N, V] and both sides' bucket log-probs [N, K + 1]: the teacher's top-k
    tokens, then one bucket for the rest of the vocabulary."""
    ls = _log_softmax(scaled(student_NxV, temperature, valid_vocab))
    ls_k = np.take_along_axis(ls, teacher_ids_NxK, axis=-1)
    lt_k = np.asarray(teacher_logprobs_NxK, np.float64)
    with np.errstate(divide="ignore"):
        tail_s = np.log1p(-np.exp(ls_k).sum(-1))
        tail_t = np.log1p(-np.exp(lt_k).sum(-1))
    return ls, np.concatenate([ls_k, tail_s[:, None]], -1), np.concatenate([lt_k, tail_t[:, None]], -1)


def topk_divergence(student_NxV, teacher_ids_NxK, teacher_logprobs_NxK, beta, temperature=1.0, valid_vocab=None):
    """float64 [N]: the divergence between the two bucket distributions (top-k + tail)."""
    _, a, b = _topk_buckets(student_NxV, teacher_ids_NxK, teacher_logprobs_NxK, temperature, valid_vocab)
    pa, pb = np.exp(a), np.exp(b)
    lm = None
    if 0.0 < beta < 1.0:
        with np.errstate(divide="ignore"):
            lm = np.log(beta * pb + (1 - beta) * pa)
    return _divergence(a, b, pa, pb, lm, beta)


def topk_student_grad(student_NxV, teacher_ids_NxK, teacher_logprobs_NxK, beta, temperature=1.0,
                      valid_vocab=None):
    """float64 [N, V]: d topk_divergence[n] / d student logits[n, :]. With c_j the derivative by
    bucket j's student probability q_j, a logit's gradient is p_l (c_bucket(l) - sum_j q_j c_j)."""
    ls, a, b = _topk_buckets(student_NxV, teacher_ids_NxK, teacher_logprobs_NxK, temperature, valid_vocab)
    pa, pb = np.exp(a), np.exp(b)
    with np.errstate(invalid="ignore", divide="ignore"):
        if beta == 0.0:
            c = -pb / pa
        elif beta == 1.0:
            c = a - b
        else:
            c = (1 - beta) * (a - np.log(beta * pb + (1 - beta) * pa))
    per_logit = np.repeat(c[:, -1:], ls.shape[1], axis=1)
    np.put_along_axis(per_logit, teacher_ids_NxK, c[:, :-1], axis=1)
    ps = np.exp(ls)
    return _plogq(ps, per_logit - (pa * c).sum(-1, keepdims=True)) / temperature


def assert_matches_finite_differences(f, g, s, rng, *, eps=1e-6, directions=4, rtol=1e-6, atol=1e-7):
    """g, the claimed gradient of the float64 scalar f at s, along random directions."""
    for _ in range(directions):
        direction = rng.normal(size=s.shape)
        fd = (f(s + eps * direction) - f(s - eps * direction)) / (2 * eps)
        np.testing.assert_allclose(np.sum(np.asarray(g, np.float64) * direction), fd, rtol=rtol, atol=atol)


def near_identical_logits(rng, n, v, kl=4e-7):
    """float32 logits [n, v] whose true KL (either direction) is about `kl`: a common offset
    (which the softmax removes) plus a small perturbation."""
    zs = rng.normal(size=(n, v)) * 2.0
    zt = zs + 3.0 + np.sqrt(2.0 * kl) * rng.normal(size=(n, v))  # KL ~ Var(perturbation) / 2
    return zs.astype(np.float32), zt.astype(np.float32)
