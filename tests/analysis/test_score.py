"""Padded lengths of scoring batches, and scores on a device mesh against one device."""

import numpy as np
import pytest

from opsd_jax.analysis.score import POWER_OF_TWO_UP_TO, batch_lengths, bucket_length
from opsd_jax.config import PromptSection
from opsd_jax.data.sources import Problem
from opsd_jax.distill.prompts import prompt_pair
from opsd_jax.testing import save_tiny_hf_model, save_tiny_tokenizer


def test_bucket_length_is_a_power_of_two_up_to_4096_then_pads_at_most_a_quarter():
    assert [bucket_length(n) for n in (1, 32, 33, 100, 4096)] == [32, 32, 64, 128, 4096]
    # The paper's evaluation cap: 38,912 tokens pad to Qwen3's 40,960-token context, not 65,536.
    assert bucket_length(38_912) == 40_960 and bucket_length(38_912 + 1_024) == 40_960
    lengths = np.arange(1, 140_000, 7)
    buckets = np.array([bucket_length(int(n)) for n in lengths])
    assert (buckets >= lengths).all() and (np.diff(buckets) >= 0).all()
    above = lengths > POWER_OF_TWO_UP_TO
    assert (buckets[above] / lengths[above]).max() <= 1.25
    for octave in range(12, 17):  # at most four compiled lengths per doubling
        inside = (lengths > 2**octave) & (lengths <= 2 ** (octave + 1))
        assert len(set(buckets[inside].tolist())) <= 4


def test_batch_lengths_pad_each_context_from_its_own_rollouts():
    # A short prompt with a long rollout beside a long prompt with a short one: each context
    # needs the longest prompt + completion of its own rows, not the longest of each added.
    student, teacher, completion = batch_lengths([100, 900], [3_000, 20_000], [30_000, 500])
    assert completion == bucket_length(30_000) == 32_768
    assert student == bucket_length(30_100) == 32_768
    assert teacher == bucket_length(33_000) == 40_960


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, model_seed):
    from opsd_jax.checkpoint.loading import load_for_serving

    path = str(tmp_path_factory.mktemp("student"))
    save_tiny_hf_model("qwen3", path, seed=model_seed)
    save_tiny_tokenizer(path)
    return path, load_for_serving(path, dtype="float32")


@pytest.mark.parametrize("mesh_shape", [(1, 4, 2), (2, 2, 2)])
def test_scores_on_a_mesh_equal_one_device_and_keep_the_rollouts_order(loaded, mesh_shape, rng):
    from opsd_jax.analysis.score import score_rollouts
    from opsd_jax.checkpoint.loading import load_for_serving
    from opsd_jax.parallel import make_mesh

    path, (config, params, tokenizer, _) = loaded
    problem = Problem(id="p", problem="What is 6 * 7?", solution="Six sevens: 6 * 7 = 42.", answer="42")
    privileged = prompt_pair(problem, PromptSection(privilege="dense"), tokenizer)
    vanilla = prompt_pair(problem, PromptSection(privilege="none"), tokenizer)
    # Lengths out of order, so the length-sorted batches differ from the given order.
    token_ids = [rng.integers(3, len(tokenizer), n).tolist() for n in (40, 3, 70, 12, 25)]
    pairs = dict(privileged_pairs=[privileged] * 5, vanilla_pairs=[vanilla] * 5, token_ids=token_ids)
    # One rollout per batch on one device: nothing sorted, nothing padded beside another rollout.
    reference = score_rollouts(params, config, params, config, batch_size=1, **pairs)
    mesh = make_mesh(*mesh_shape)
    _, mesh_params, _, _ = load_for_serving(path, dtype="float32", mesh=mesh)
    on_mesh = score_rollouts(mesh_params, config, None, config, mesh=mesh, impl="xla", batch_size=4, **pairs)
    for ids, one, many in zip(token_ids, reference, on_mesh, strict=True):
        assert {len(v) for v in many.values()} == {len(ids)}
        for name in one:
            np.testing.assert_allclose(many[name], one[name], atol=2e-5, err_msg=name)
        # teacher_params None is the student: the vanilla teacher's scores are the student's,
        # exactly (a third forward at the teacher contexts' padding would round differently).
        np.testing.assert_array_equal(many["vanilla_logprob"], many["student_logprob"])
        np.testing.assert_array_equal(many["vanilla_entropy"], many["student_entropy"])
        np.testing.assert_array_equal(many["vanilla_divergence"], 0.0)
