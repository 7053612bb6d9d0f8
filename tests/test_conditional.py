"""Conditional steering (CAST) against hand computations: the condition score is the cosine of the
mean residual (a plain hook read) with the condition vector; rows above the threshold get the
vector added (a plain hook forward), the others keep the model's own logits; generation keeps the
prompt's decision; the fitted threshold separates labelled prompts."""

import pytest
import torch

from causalscan.errors import InputError
from causalscan.steering.conditional import cast, fit_threshold, scores

from naive import read, run
from tolerance import assert_close


def _setup(tiny):
    model = tiny("llama")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 100, (6, 5), generator=g)
    d = model.adapter.d_model
    return model, ids, torch.randn(d, generator=g), torch.randn(d, generator=g)


def test_scores_are_the_cosine_of_the_mean_residual(tiny):
    model, ids, cond, _ = _setup(tiny)
    hand = torch.cosine_similarity(read(model, ids, "resid_pre", 1)[:, :, 0].mean(1), cond[None], dim=-1)
    assert_close(scores(model, ids, cond, 1), hand, 1e-5)


def test_rows_above_the_threshold_are_steered_and_only_they(tiny):
    model, ids, cond, vec = _setup(tiny)
    s = scores(model, ids, cond, 0)
    threshold = s.median().item()  # about half the rows steered
    with torch.no_grad(), cast(model, cond, vec, condition_layer=0, layer=1, threshold=threshold, alpha=2.0) as st:
        got = model.hf(input_ids=ids).logits
    mask = s > threshold
    assert torch.equal(st["mask"].cpu(), mask) and 0 < mask.sum() < len(mask)

    def add(view, pre):
        view += 2.0 * vec

    with torch.no_grad():
        steered = run(model, ids, "resid_post", 1, add)
        plain = model.hf(input_ids=ids).logits
    assert_close(got[mask], steered[mask], 1e-5)
    assert torch.equal(got[~mask], plain[~mask])


def test_generation_keeps_the_prompts_decision(tiny):
    """Greedy generation under CAST equals, row by row, generation with the vector always added
    (steered rows) or never (the others)."""
    from causalscan.model import interventions as iv

    model, ids, cond, vec = _setup(tiny)
    threshold = scores(model, ids, cond, 0).median().item()
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        with cast(model, cond, 3 * vec, 0, 1, threshold) as st:
            got = model.hf.generate(input_ids=ids, **kw)
        with iv.perturb(model, iv.add("resid_post", 3 * vec, layers=1)):
            always = model.hf.generate(input_ids=ids, **kw)
        never = model.hf.generate(input_ids=ids, **kw)
    mask = st["mask"].cpu()
    assert torch.equal(got[mask], always[mask]) and torch.equal(got[~mask], never[~mask])
    assert not torch.equal(always, never)


def test_fitted_threshold_separates_labelled_prompts(tiny):
    model, ids, cond, _ = _setup(tiny)
    s = scores(model, ids, cond, 1)
    order = s.argsort()
    pos, neg = ids[order[3:]].tolist(), ids[order[:3]].tolist()  # separable by construction
    threshold, acc = fit_threshold(model, pos, neg, cond, 1)
    assert acc == 1.0 and s[order[2]] < threshold < s[order[3]]


def test_options_are_checked(tiny):
    model, ids, cond, vec = _setup(tiny)
    with pytest.raises(InputError, match="field 'layer'"):
        with cast(model, cond, vec, condition_layer=1, layer=0, threshold=0.0):
            pass
    with pytest.raises(InputError, match="field 'vector'"):
        with cast(model, cond, vec[:3], 0, 1, 0.0):
            pass
