"""Offline teacher cache (Lightning OPD): score fixed rollouts with the teacher once, train without it.

Lightning OPD (arXiv 2604.13010 in the seed list) precomputes the teacher's log-probabilities over the
SFT model's rollouts and then trains with no live teacher; it requires that the same teacher be used to
build the cache and to define the objective ("teacher consistency"), which the cache records.

A :class:`TeacherCache` holds R rows; row r has its student prompt ``prompt_ids[r]`` (unpadded), its
trained completion tokens ``completion[r]`` (``T_r`` tokens, the end-of-turn token included) and, per
completion token, the teacher's top-k log-probabilities and token ids ``(T_r, k)`` plus the log-prob of
the token itself ``(T_r,)``, all at the loss temperature. Rows are stored ragged (concatenated, with
offsets) in one ``.safetensors`` file with the metadata (teacher name, k, temperature, vocabulary size,
tokenizer fingerprint) in its header; :meth:`TeacherCache.load` returns bit-identical tensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .rollout import Prompts, Rollout
from .scoring import TeacherScores, flat_positions, score_teacher

CACHE_FORMAT = "embodied_distill.lm.teacher_cache/1"


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary (token -> id), to detect a cache built for another one."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


@dataclass
class TeacherCache:
    """Ragged rows of (prompt, completion, teacher top-k + token log-probs); see the module docstring."""

    prompt_tokens: Tensor  # (sum P_r,) int64
    prompt_offsets: Tensor  # (R + 1,) int64
    completion_tokens: Tensor  # (sum T_r,) int64
    completion_offsets: Tensor  # (R + 1,) int64
    topk_logprobs: Tensor  # (sum T_r, k) float32
    topk_indices: Tensor  # (sum T_r, k) int64
    token_logprobs: Tensor  # (sum T_r,) float32
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.prompt_offsets.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.completion_tokens.shape[0])

    # ----------------------------------------------------------------------------------- building
    @classmethod
    def empty(cls, k: int, meta: dict) -> TeacherCache:
        z = torch.zeros(0, dtype=torch.long)
        return cls(
            z,
            torch.zeros(1, dtype=torch.long),
            z,
            torch.zeros(1, dtype=torch.long),
            torch.zeros(0, k),
            torch.zeros(0, k, dtype=torch.long),
            torch.zeros(0),
            dict(meta),
        )

    def append(self, rollout: Rollout, scores: TeacherScores, token_logprobs: Tensor) -> None:
        """Add a scored rollout (``scores`` in top-k mode over its N trained positions)."""
        prompts, mask = rollout.student_prompts, rollout.completion_mask.bool()
        p_rows = [prompts.ids[i][prompts.mask[i].bool()] for i in range(prompts.ids.shape[0])]
        c_rows = [rollout.completion[i][mask[i]] for i in range(mask.shape[0])]
        self.prompt_tokens = torch.cat([self.prompt_tokens, *[r.cpu().long() for r in p_rows]])
        self.completion_tokens = torch.cat([self.completion_tokens, *[r.cpu().long() for r in c_rows]])
        self.prompt_offsets = _extend_offsets(self.prompt_offsets, [len(r) for r in p_rows])
        self.completion_offsets = _extend_offsets(self.completion_offsets, [len(r) for r in c_rows])
        self.topk_logprobs = torch.cat([self.topk_logprobs, scores.topk_logprobs.detach().float().cpu()])
        self.topk_indices = torch.cat([self.topk_indices, scores.topk_indices.detach().long().cpu()])
        self.token_logprobs = torch.cat([self.token_logprobs, token_logprobs.detach().float().cpu()])

    # ----------------------------------------------------------------------------------- reading
    def batch(self, rows: Sequence[int], pad_token_id: int) -> tuple[Rollout, TeacherScores]:
        """Rows as a left-padded prompt / right-padded completion :class:`Rollout` and their cached
        :class:`TeacherScores` (top-k and token log-probs over the N trained positions, row-major)."""
        rows = [int(r) for r in rows]
        prompts = [self.prompt_tokens[self.prompt_offsets[r] : self.prompt_offsets[r + 1]] for r in rows]
        spans = [(int(self.completion_offsets[r]), int(self.completion_offsets[r + 1])) for r in rows]
        width_p = max(len(p) for p in prompts)
        width_c = max(b - a for a, b in spans)
        ids = torch.full((len(rows), width_p), pad_token_id, dtype=torch.long)
        pmask = torch.zeros(len(rows), width_p, dtype=torch.long)
        completion = torch.full((len(rows), width_c), pad_token_id, dtype=torch.long)
        cmask = torch.zeros(len(rows), width_c, dtype=torch.bool)
        for i, (p, (a, b)) in enumerate(zip(prompts, spans)):
            ids[i, width_p - len(p) :] = p
            pmask[i, width_p - len(p) :] = 1
            completion[i, : b - a] = self.completion_tokens[a:b]
            cmask[i, : b - a] = True
        index = torch.cat([torch.arange(a, b) for a, b in spans])
        student = Prompts(ids, pmask)
        rollout = Rollout(student, student, completion, cmask, source="cache")
        scores = TeacherScores(
            topk_logprobs=self.topk_logprobs[index],
            topk_indices=self.topk_indices[index],
            token_logprobs=self.token_logprobs[index],
        )
        return rollout, scores

    # ----------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename) to ``path`` (``.safetensors``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "prompt_tokens": self.prompt_tokens,
            "prompt_offsets": self.prompt_offsets,
            "completion_tokens": self.completion_tokens,
            "completion_offsets": self.completion_offsets,
            "topk_logprobs": self.topk_logprobs,
            "topk_indices": self.topk_indices,
            "token_logprobs": self.token_logprobs,
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file(
                {k: v.contiguous() for k, v in tensors.items()},
                tmp,
                metadata={"format": CACHE_FORMAT, "meta": json.dumps(self.meta, sort_keys=True)},
            )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TeacherCache:
        """Read a cache written by :meth:`save`; raises ``ValueError`` for a file of another format."""
        from safetensors import safe_open

        path = Path(path)
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        if header.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"{path} is not an embodied_distill teacher cache (format {header.get('format')!r})"
            )
        t = load_file(str(path))
        return cls(
            t["prompt_tokens"],
            t["prompt_offsets"],
            t["completion_tokens"],
            t["completion_offsets"],
            t["topk_logprobs"],
            t["topk_indices"],
            t["token_logprobs"],
            json.loads(header["meta"]),
        )

    def check_matches(
        self, *, teacher: str, k: int, temperature: float, vocab_size: int, tokenizer_hash: str
    ) -> None:
        """Teacher consistency: raise ``ValueError`` naming the difference when the cache was built for
        another teacher, tokenizer, vocabulary, k or temperature."""
        want = {
            "teacher": teacher,
            "k": k,
            "temperature": temperature,
            "vocab_size": vocab_size,
            "tokenizer": tokenizer_hash,
        }
        diffs = [
            f"{key}: cache has {self.meta.get(key)!r}, run uses {value!r}"
            for key, value in want.items()
            if self.meta.get(key) != value
        ]
        if diffs:
            raise ValueError(
                "the offline teacher cache does not match this run (teacher consistency): "
                + "; ".join(diffs)
                + ". Delete it or point offline.path elsewhere to rebuild it"
            )


def _extend_offsets(offsets: Tensor, lengths: Sequence[int]) -> Tensor:
    added = offsets[-1] + torch.tensor(lengths, dtype=torch.long).cumsum(0)
    return torch.cat([offsets, added])


@torch.no_grad()
def score_for_cache(
    teacher, rollout: Rollout, *, k: int, temperature: float, chunk_size: int = 256
) -> tuple[TeacherScores, Tensor]:
    """The teacher's top-k scores and token log-probs ``(N,)`` for one rollout, from one forward pass."""
    full = score_teacher(teacher, rollout, "full", chunk_size=chunk_size)
    from embodied_distill.losses import teacher_topk, token_log_probs

    tokens = flat_positions(rollout.completion, rollout.completion_mask)
    lps, idxs, toks = [], [], []
    for start in range(0, full.num_positions, chunk_size):
        logits = full.logits_chunk(start, start + chunk_size)
        lp, idx = teacher_topk(logits, min(k, logits.shape[-1]), temperature)
        lps.append(lp)
        idxs.append(idx)
        toks.append(token_log_probs(logits, tokens[start : start + chunk_size], temperature))
    if not lps:
        return TeacherScores(
            topk_logprobs=torch.zeros(0, k), topk_indices=torch.zeros(0, k, dtype=torch.long)
        ), torch.zeros(0)
    return TeacherScores(topk_logprobs=torch.cat(lps), topk_indices=torch.cat(idxs)), torch.cat(toks)
