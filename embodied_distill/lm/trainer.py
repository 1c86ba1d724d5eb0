"""On-policy distillation of a language model, one optimiser step at a time (GKD / OPD and relatives).

Papers: GKD (Agarwal et al., ICLR 2024, arXiv:2306.13649), MiniLLM (arXiv:2306.08543), Thinking
Machines' on-policy distillation, DistiLLM (arXiv:2402.03898), TAID (arXiv:2501.16937), TIP, G-OPD /
ExOPD, Lightning OPD, OPSD (self-distillation); see ``shared/reference/methods.md``.

One step of :class:`Distiller`, top to bottom:

1. **Who writes the completions.** With probability ``lmbda`` the student samples them (on-policy);
   otherwise the teacher (``seq_kd``) or the dataset's reference completions. One draw per step, as
   TRL's GKDTrainer does. In offline mode the completions and teacher scores come from the cache.
2. **Rollouts and teacher scores** for all ``grad_accum`` micro-batches, without gradient; with TIP,
   also the token selection (a gradient-free student pass). The trained tokens of all micro-batches of
   all processes are counted: that count normalises the loss (``num_items``), so the accumulated
   gradient equals the gradient of one big batch.
3. **Loss and backward** per micro-batch: the student's hidden states at the trained positions and the
   teacher's scores go to :func:`~embodied_distill.lm.objective.distill_loss` (the loss core).
4. Gradients are averaged across processes (torchrun / gloo or nccl), clipped, and AdamW steps.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from embodied_distill import distributed
from embodied_distill.losses import TaidState, taid_update
from embodied_distill.memory import set_mmap_threshold

from .config import LMConfig
from .models import check_compatible
from .objective import StudentRows, distill_loss, tip_mask
from .offline import TeacherCache
from .rollout import (
    Rollout,
    completion_mask,
    encode_examples,
    eos_ids,
    generate,
    strip_padding,
    tokenize_completions,
)
from .scoring import (
    TeacherScores,
    completion_outputs,
    flat_positions,
    linear_head,
    sampled_logprobs,
    score_teacher,
)
from .tasks import Example


def _adamw(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters) where this torch build supports it for the device."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


@dataclass
class _MicroBatch:
    rollout: Rollout
    teacher: TeacherScores
    keep: Tensor | None  # TIP selection over the N rows (bool), None = all
    ref_logprobs: Tensor | None
    num_tokens: int


class Distiller:
    """Holds the student, the teacher (or an offline cache), the optimiser and the step counter.

    Args:
        student: a Hugging Face causal LM (trained in place).
        tokenizer: the student's tokenizer (the teacher must share it).
        teacher: the teacher model, ``None`` in offline mode or for self-distillation (the student is
            then its own teacher, shown the privileged context).
        examples: the training prompts.
        cfg: :class:`~embodied_distill.lm.config.LMConfig`.
        cache: the offline :class:`~embodied_distill.lm.offline.TeacherCache` (offline mode).
        teacher_tokenizer: checked against ``tokenizer`` (vocabulary and ids) when given.
    """

    def __init__(
        self,
        student: nn.Module,
        tokenizer,
        teacher: nn.Module | None,
        examples: Sequence[Example],
        cfg: LMConfig,
        *,
        cache: TeacherCache | None = None,
        teacher_tokenizer=None,
    ):
        self.cfg, self.d, self.t = cfg, cfg.distill, cfg.train
        self.student, self.tokenizer = student, tokenizer
        if self.t.mmap_threshold_mib is not None:
            set_mmap_threshold(self.t.mmap_threshold_mib)
        if self.t.gradient_checkpointing:
            if not getattr(student, "supports_gradient_checkpointing", False):
                raise ValueError(
                    f"train.gradient_checkpointing: {type(student).__name__} does not support it"
                )
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.examples = list(examples)
        if not self.examples and cache is None:
            raise ValueError("no training examples")
        self.cache = cache
        if cfg.offline.enabled:
            if cache is None:
                raise ValueError("offline mode needs a TeacherCache")
            self.teacher = None
        elif self.d.self_distill:
            self.teacher = student
        else:
            if teacher is None:
                raise ValueError("a live teacher is needed (or set offline.enabled / distill.self_distill)")
            check_compatible(student, teacher, tokenizer, teacher_tokenizer)
            self.teacher = teacher.eval().requires_grad_(False)
        self.spec = self.d.loss_spec()
        self.device = next(student.parameters()).device
        self.rank, self.world = distributed.init()
        distributed.broadcast_parameters(student)
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = _adamw(self.params, self.t.lr, self.t.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / self.t.warmup_steps) if self.t.warmup_steps else 1.0
        )
        self.reference = None
        if self.d.exopd_lambda != 1.0:  # G-OPD's pi_ref: the frozen initial student
            self.reference = copy.deepcopy(student).eval().requires_grad_(False)
        self.eos = eos_ids(tokenizer, student)
        self.pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0])
        self.taid = TaidState(t=self.d.taid_t_start)
        self.step_count = 0
        self.student_head = linear_head(student)
        if self.d.loss_path == "hidden" and self.student_head is None:  # no plain head: chunk the logits
            self.spec = dataclasses.replace(self.spec, loss_path="chunked")

    # ------------------------------------------------------------------------------------ rollouts
    def _rng(self, step: int, micro: int = 0) -> random.Random:
        """Per (seed, step, rank, micro-batch) randomness: resuming a run repeats the same draws."""
        return random.Random(f"{self.t.seed}/{step}/{self.rank}/{micro}")

    def choose_source(self, step: int) -> str:
        """``"student"`` with probability lambda, else ``"teacher"`` (seq_kd) or ``"dataset"``; the
        same for all processes of a step."""
        if random.Random(f"{self.t.seed}/source/{step}").random() < self.d.lmbda:
            return "student"
        return "teacher" if self.d.seq_kd else "dataset"

    def make_rollout(self, examples: Sequence[Example], source: str) -> Rollout:
        """Completions for ``examples`` written by ``source`` (see :meth:`choose_source`)."""
        template = self.d.context_template if self.d.self_distill else None
        student_p, teacher_p = encode_examples(self.tokenizer, examples, template)
        student_p, teacher_p = student_p.to(self.device), teacher_p.to(self.device)
        if source == "dataset":
            missing = [e.prompt for e in examples if e.completion is None]
            if missing:
                raise ValueError(
                    f"dataset completions are missing (e.g. for {missing[0]!r}); set distill.seq_kd=true "
                    "or distill.lmbda=1, or give 'completion' in the prompt file"
                )
            completion = tokenize_completions(
                self.tokenizer, [e.completion for e in examples], self.d.max_new_tokens
            ).to(self.device)
        else:
            model, prompts = (self.student, student_p) if source == "student" else (self.teacher, teacher_p)
            completion = generate(
                model,
                prompts,
                max_new_tokens=self.d.max_new_tokens,
                eos_token_id=self.eos,
                pad_token_id=self.pad,
                temperature=self.d.temperature,
            )
        completion, mask = strip_padding(completion, completion_mask(completion, self.eos))
        return Rollout(student_p, teacher_p, completion, mask, source)

    # ------------------------------------------------------------------------------------ student
    def student_rows(self, rollout: Rollout) -> StudentRows:
        """The student's hidden states (or logits) at the N trained positions, with gradient."""
        hidden = self.student_head is not None
        out = completion_outputs(
            self.student, rollout.student_prompts, rollout.completion, rollout.completion_mask, hidden=hidden
        )
        rows = flat_positions(out, rollout.completion_mask)
        tokens = flat_positions(rollout.completion, rollout.completion_mask)
        if hidden:
            weight, bias = self.student_head
            return StudentRows(tokens=tokens, hidden=rows, weight=weight, bias=bias)
        return StudentRows(tokens=tokens, logits=rows)

    def _prepare(self, step: int, source: str) -> list[_MicroBatch]:
        batches = []
        for micro in range(self.t.grad_accum):
            rng = self._rng(step, micro)
            if self.cache is not None:
                rows = [rng.randrange(len(self.cache)) for _ in range(self.t.batch_size)]
                rollout, teacher = self.cache.batch(rows, self.pad)
                rollout = rollout.to(self.device)
                teacher = TeacherScores(
                    topk_logprobs=teacher.topk_logprobs.to(self.device),
                    topk_indices=teacher.topk_indices.to(self.device),
                )
            else:
                examples = [
                    self.examples[rng.randrange(len(self.examples))] for _ in range(self.t.batch_size)
                ]
                rollout = self.make_rollout(examples, source)
                teacher = score_teacher(
                    self.teacher,
                    rollout,
                    self.d.teacher_scoring,
                    k=self.d.k,
                    temperature=self.d.temperature,
                    chunk_size=self.d.chunk_size,
                    prefix_cache=self.d.teacher_prefix_cache,
                )
            ref = None
            if self.reference is not None:
                ref = sampled_logprobs(
                    self.reference,
                    rollout.student_prompts,
                    rollout,
                    temperature=self.d.temperature,
                    chunk_size=self.d.chunk_size,
                )
            keep = None
            n = rollout.num_tokens
            if self.d.tip_fraction < 1.0:
                with torch.no_grad():
                    keep = tip_mask(
                        self.spec,
                        self.student_rows(rollout),
                        teacher,
                        keep_fraction=self.d.tip_fraction,
                        rule=self.d.tip_rule,
                        taid_t=self.taid.t,
                    )
                n = int(keep.sum())
            batches.append(_MicroBatch(rollout, teacher, keep, ref, n))
        return batches

    # ------------------------------------------------------------------------------------ step
    def backward(self, batches: Sequence[_MicroBatch]) -> tuple[float, dict[str, float], int]:
        """Accumulate the gradients of all micro-batches; returns ``(loss, stats, trained tokens)``.

        The loss of each micro-batch is its token sum divided by the trained tokens of *all*
        micro-batches of all processes, so the accumulated gradient is the gradient of the mean over
        every trained token of the step, however the tokens are spread over micro-batches.
        """
        local = sum(b.num_tokens for b in batches)
        total = local
        if self.world > 1:
            count = torch.tensor([float(local)], device=self.device)
            torch.distributed.all_reduce(count)
            total = int(count.item())
        # average_gradients() divides by the world size, so each process normalises by total / world.
        num_items = max(total, 1) / self.world
        loss_value, stats = 0.0, {}
        for b in batches:
            rows = self.student_rows(b.rollout)
            teacher, ref = b.teacher, b.ref_logprobs
            if b.keep is not None:
                rows, teacher = rows.select(b.keep), teacher.select(b.keep)
                ref = None if ref is None else ref[b.keep]
            loss, extra = distill_loss(
                self.spec, rows, teacher, num_items=num_items, taid_t=self.taid.t, ref_logprobs=ref
            )
            loss.backward()
            loss_value += float(loss.detach())
            for key, value in extra.items():
                stats[key] = stats.get(key, 0.0) + value / len(batches)
        if (
            self.world > 1
        ):  # each rank holds local_sum * world / total: the mean over ranks is the step's mean
            value = torch.tensor([loss_value], device=self.device)
            torch.distributed.all_reduce(value)
            loss_value = float(value.item()) / self.world
        return loss_value, stats, total

    def step(self) -> dict[str, float]:
        """One optimiser step over ``grad_accum`` micro-batches; returns its metrics."""
        step = self.step_count
        t0 = time.perf_counter()
        self.student.train()
        source = "cache" if self.cache is not None else self.choose_source(step)
        batches = self._prepare(step, source)
        t_rollout = time.perf_counter() - t0
        loss_value, stats, total = self.backward(batches)
        distributed.average_gradients(self.params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.t.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.d.loss == "taid":
            self.taid = taid_update(
                self.taid,
                loss_value,
                step + 1,
                max(self.t.steps, 1),
                t_start=self.d.taid_t_start,
                t_end=self.d.taid_t_end,
                adaptive=self.d.taid_adaptive,
            )
        self.step_count += 1
        seconds = time.perf_counter() - t0
        return {
            "loss": loss_value,
            "tokens": float(total),
            "grad_norm": grad_norm,
            "step_time_s": seconds,
            "rollout_time_s": t_rollout,
            "tokens_per_s": total / seconds if seconds > 0 else math.nan,
            "on_policy": float(source == "student"),
            "taid_t": self.taid.t,
            "lr": self.scheduler.get_last_lr()[0],
            **stats,
        }
