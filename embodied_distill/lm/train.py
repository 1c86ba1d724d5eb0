"""Language-model distillation entry point: ``python -m embodied_distill.lm.train [group=option ...]``.

Composes ``configs/lm/train.yaml`` (groups ``teacher``, ``student``, ``task``, ``method``) with Hydra,
loads the models, evaluates the student on the held-out prompts, trains with
:class:`~embodied_distill.lm.trainer.Distiller`, evaluates again and saves. Examples::

    python -m embodied_distill.lm.train                          # GKD (JSD 0.5, lambda 0.5), plural task
    python -m embodied_distill.lm.train method=opd train.steps=100  # sampled-token reverse KL (OPD)
    python -m embodied_distill.lm.train method=offline           # Lightning-OPD offline teacher cache
    python -m embodied_distill.lm.train task=prompt_file task.path=my.jsonl student=hf student.name_or_path=D
    torchrun --nproc_per_node=2 -m embodied_distill.lm.train ... # data parallel (gloo on CPU)

The run directory (``outputs/lm/<task>/<method>_<student>_seed<seed>``) holds ``checkpoint/``
(``save_pretrained`` model + tokenizer, ``config.yaml``, ``meta.json``), ``train_state/`` (resume),
``metrics.jsonl``, ``report.json`` and, in offline mode, ``teacher_cache.safetensors``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import embodied_distill.configs as _configs
from embodied_distill import distributed
from embodied_distill.checkpoint import (
    _atomic_dir_write,
    git_sha,
    load_train_state,
    save_train_state,
    versions,
)
from embodied_distill.train import resolve_device

from .config import LMConfig
from .evaluation import divergence_to_teacher, exact_match_accuracy
from .models import (
    check_compatible,
    layer_subset_student,
    load_causal_lm,
    tiny_chat_tokenizer,
    tiny_llama,
)
from .offline import TeacherCache, score_for_cache, tokenizer_fingerprint
from .rollout import (
    Rollout,
    completion_mask,
    encode_examples,
    eos_ids,
    generate,
    strip_padding,
    tokenize_completions,
)
from .tasks import TaskSplit, load_prompt_file, make_task, split_examples, unlabeled_prompts, vocabulary_words
from .trainer import Distiller

CONFIG_DIR = str(Path(_configs.__file__).resolve().parent / "lm")


# ---------------------------------------------------------------------------------------------------
# Building blocks (also used by the benchmark and the tests)
# ---------------------------------------------------------------------------------------------------


def build_models(cfg: DictConfig):
    """``(teacher, student, tokenizer)`` from the ``teacher`` and ``student`` config groups."""
    tcfg, scfg = cfg.teacher, cfg.student
    if tcfg.kind == "tiny":
        tokenizer = tiny_chat_tokenizer()
        teacher = tiny_llama(
            len(tokenizer),
            hidden_size=tcfg.hidden_size,
            num_layers=tcfg.num_layers,
            seed=tcfg.seed,
            init_std=tcfg.get("init_std", 0.02),
        )
    elif tcfg.kind == "pretrained":
        teacher, tokenizer = load_causal_lm(tcfg.name_or_path)
    else:
        raise ValueError(f"teacher.kind must be 'pretrained' or 'tiny', got {tcfg.kind!r}")
    teacher.eval().requires_grad_(False)
    if scfg.kind == "layers":
        student = layer_subset_student(teacher, list(scfg.layers))
    elif scfg.kind == "tiny":
        student = tiny_llama(
            len(tokenizer), hidden_size=scfg.hidden_size, num_layers=scfg.num_layers, seed=scfg.seed
        )
    elif scfg.kind == "pretrained":
        student, student_tokenizer = load_causal_lm(scfg.name_or_path)
        check_compatible(student, teacher, student_tokenizer, tokenizer)
    else:
        raise ValueError(f"student.kind must be 'layers', 'pretrained' or 'tiny', got {scfg.kind!r}")
    student.train()
    if scfg.get("freeze_embeddings", False):
        student.get_input_embeddings().weight.requires_grad_(False)
        student.get_output_embeddings().weight.requires_grad_(False)
    check_compatible(student, teacher, tokenizer, tokenizer)
    return teacher, student, tokenizer


def build_task(cfg: DictConfig, tokenizer=None) -> TaskSplit:
    """The train / held-out split from the ``task`` config group (``task.unlabeled_prompts`` adds that many
    answer-less training prompts built from the tokenizer's whole-word tokens)."""
    task = cfg.task
    if task.kind == "builtin":
        split = make_task(
            task.name,
            n_test=task.n_test,
            seed=task.split_seed,
            digits=task.get("digits", 1),
            max_train=task.get("max_train"),
            context=bool(cfg.distill.self_distill),
        )
        n_extra = int(task.get("unlabeled_prompts") or 0)
        if n_extra:
            if tokenizer is None:
                raise ValueError("task.unlabeled_prompts needs the tokenizer")
            held = {e.prompt for e in split.test} | {e.prompt for e in split.train}
            extra = unlabeled_prompts(
                task.name, vocabulary_words(tokenizer), n_extra, seed=task.split_seed, exclude=held
            )
            split = TaskSplit(split.name, split.train + extra, split.test)
        return split
    if task.kind == "prompt_file":
        if not task.path:
            raise ValueError("task=prompt_file needs task.path=<file.jsonl or file.txt>")
        examples = load_prompt_file(task.path, kind=task.get("answer_kind", "word"))
        split = split_examples(examples, task.n_test, seed=task.split_seed)
        if task.get("test_path"):
            split = TaskSplit("prompt_file", split.train, load_prompt_file(task.test_path))
        return split
    raise ValueError(f"task.kind must be 'builtin' or 'prompt_file', got {task.kind!r}")


@torch.no_grad()
def build_offline_cache(
    teacher,
    student,
    tokenizer,
    examples,
    lm: LMConfig,
    *,
    teacher_name: str,
    batch_size: int = 16,
    seed: int = 0,
) -> TeacherCache:
    """Generate ``samples_per_prompt`` completions per training prompt with ``offline.source`` and store
    the teacher's top-k / token log-probs for them (Lightning OPD's precompute step)."""
    d, off = lm.distill, lm.offline
    meta = {
        "teacher": teacher_name,
        "k": d.k,
        "temperature": d.temperature,
        "vocab_size": len(tokenizer),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "source": off.source,
    }
    meta["vocab_size"] = int(teacher.get_output_embeddings().weight.shape[0])
    cache = TeacherCache.empty(d.k, meta)
    eos = eos_ids(tokenizer, student)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
    device = next(student.parameters()).device
    torch.manual_seed(seed)
    rows = [e for e in examples for _ in range(off.samples_per_prompt)]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts, _ = encode_examples(tokenizer, chunk)
        prompts = prompts.to(device)
        if off.source == "dataset":
            completion = tokenize_completions(tokenizer, [e.completion for e in chunk], d.max_new_tokens).to(
                device
            )
        else:
            model = student if off.source == "student" else teacher
            completion = generate(
                model,
                prompts,
                max_new_tokens=d.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
                temperature=d.temperature,
                greedy=off.greedy,
            )
        completion, mask = strip_padding(completion, completion_mask(completion, eos))
        rollout = Rollout(prompts, prompts, completion, mask, off.source)
        scores, token_lp = score_for_cache(
            teacher, rollout, k=d.k, temperature=d.temperature, chunk_size=d.chunk_size
        )
        cache.append(rollout, scores, token_lp)
    return cache


def unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``state_dict`` without the second name of tied tensors (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for key, value in model.state_dict().items():
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ptr in seen:
            continue
        seen.add(ptr)
        out[key] = value
    return out


def save_student(path: Path, student, tokenizer, cfg: DictConfig, meta: dict) -> Path:
    """Atomically write ``save_pretrained`` weights + tokenizer, ``config.yaml`` and ``meta.json``."""

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (tmp / "meta.json").write_text(
            json.dumps({"versions": versions(), "git_sha": git_sha(), **meta}, indent=2)
        )

    _atomic_dir_write(path, write)
    return path


def evaluate(student, teacher, tokenizer, split: TaskSplit, lm: LMConfig) -> dict:
    """Held-out exact-match (when answers exist) and the divergence to the teacher on the test prompts."""
    test = split.test[: lm.train.eval_limit] if lm.train.eval_limit else split.test
    out: dict = {}
    if not test:
        return out
    if any(e.answer is not None for e in test):
        acc = exact_match_accuracy(
            student,
            tokenizer,
            test,
            max_new_tokens=lm.train.eval_max_new_tokens,
            batch_size=lm.train.eval_batch_size,
        )
        out.update(exact_match=acc["accuracy"], exact_match_n=acc["n"], samples=acc["samples"])
    if teacher is not None:
        template = lm.distill.context_template if lm.distill.self_distill else None
        div = divergence_to_teacher(
            student,
            teacher,
            tokenizer,
            test,
            max_new_tokens=lm.train.eval_max_new_tokens,
            batch_size=lm.train.eval_batch_size,
            temperature=lm.distill.temperature,
            context_template=template,
        )
        out.update(reverse_kl_to_teacher=div["reverse_kl"], forward_kl_to_teacher=div["forward_kl"])
    return out


# ---------------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------------


def run(cfg: DictConfig, run_dir: Path) -> dict | None:
    """Train and evaluate as configured; returns the report on rank 0 (``None`` on other ranks)."""
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    torch.manual_seed(int(cfg.seed))
    lm = LMConfig(
        distill=instantiate(cfg.distill), offline=instantiate(cfg.offline), train=instantiate(cfg.train)
    )
    device = resolve_device(cfg.device)
    rank, world = distributed.init()
    main = rank == 0
    teacher, student, tokenizer = build_models(cfg)
    split = build_task(cfg, tokenizer)
    teacher.to(device)
    student.to(device)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    teacher_for_eval = student if lm.distill.self_distill else teacher

    report: dict = {
        "task": split.name,
        "method": cfg.method_name,
        "n_train": len(split.train),
        "n_test": len(split.test),
        "world_size": world,
    }
    state_dir, ckpt_dir = run_dir / "train_state", run_dir / "checkpoint"
    resumed = load_train_state(state_dir) if cfg.resume else None

    cache = None
    if lm.offline.enabled:
        cache_path = Path(lm.offline.path) if lm.offline.path else run_dir / "teacher_cache.safetensors"
        if main and not cache_path.is_file():
            t0 = time.perf_counter()
            cache = build_offline_cache(
                teacher,
                student,
                tokenizer,
                split.train,
                lm,
                teacher_name=cfg.teacher.name,
                seed=int(cfg.seed),
            )
            cache.save(cache_path)
            report["offline_cache_build_s"] = time.perf_counter() - t0
        distributed.barrier()
        cache = TeacherCache.load(cache_path)
        cache.check_matches(
            teacher=cfg.teacher.name,
            k=lm.distill.k,
            temperature=lm.distill.temperature,
            vocab_size=int(teacher.get_output_embeddings().weight.shape[0]),
            tokenizer_hash=tokenizer_fingerprint(tokenizer),
        )
        report.update(offline_cache=str(cache_path), offline_rows=len(cache), offline_tokens=cache.num_tokens)

    if main and resumed is None:
        report["before"] = evaluate(student, teacher_for_eval, tokenizer, split, lm)
        print(f"[lm] before: {_fmt(report['before'])}", flush=True)

    distiller = Distiller(
        student,
        tokenizer,
        None if (lm.offline.enabled or lm.distill.self_distill) else teacher,
        split.train,
        lm,
        cache=cache,
    )
    if resumed is not None:
        student.load_state_dict(resumed["model"], strict=False)
        student.tie_weights()
        distiller.optimizer.load_state_dict(resumed["optimizer"])
        distiller.step_count = int(resumed["step"])
        extra = resumed.get("extra", {})
        report["before"] = extra.get("before", {})
        if "taid_t" in extra:
            distiller.taid = distiller.taid.__class__(
                t=extra["taid_t"], momentum=extra.get("taid_m", 0.0), prev_loss=extra.get("taid_prev")
            )
        if main:
            print(f"[lm] resumed from {state_dir} at step {distiller.step_count}", flush=True)

    metrics_file = open(run_dir / "metrics.jsonl", "a") if main else None
    t_train, tokens = time.perf_counter(), 0.0
    start_step = distiller.step_count
    while distiller.step_count < lm.train.steps:
        m = distiller.step()
        step = distiller.step_count
        tokens += m["tokens"]
        if main and (step % lm.train.log_every == 0 or step == lm.train.steps):
            metrics_file.write(json.dumps({"step": step, "time": time.time(), **m}) + "\n")
            metrics_file.flush()
            print(
                f"[lm] step {step}/{lm.train.steps} loss {m['loss']:.4f} tokens/s {m['tokens_per_s']:.1f} "
                f"({m['step_time_s']:.2f} s/step)",
                flush=True,
            )
        if main and lm.train.eval_every and step % lm.train.eval_every == 0 and step < lm.train.steps:
            ev = evaluate(student, teacher_for_eval, tokenizer, split, lm)
            metrics_file.write(
                json.dumps({"step": step, "eval": {k: v for k, v in ev.items() if k != "samples"}}) + "\n"
            )
            print(f"[lm] step {step} eval: {_fmt(ev)}", flush=True)
        if lm.train.save_every and step % lm.train.save_every == 0 and step < lm.train.steps and main:
            _save_state(state_dir, distiller, report)
    train_seconds = time.perf_counter() - t_train
    distributed.barrier()
    if not main:
        distributed.shutdown()
        return None
    metrics_file.close()
    _save_state(state_dir, distiller, report)
    report["after"] = evaluate(student, teacher_for_eval, tokenizer, split, lm)
    report.update(
        steps=distiller.step_count,
        train_seconds=train_seconds,
        tokens_per_s=tokens / train_seconds if distiller.step_count > start_step else None,
    )
    save_student(ckpt_dir, student, tokenizer, cfg, {"step": distiller.step_count, "after": report["after"]})
    report["checkpoint"] = str(ckpt_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    distributed.shutdown()
    return report


def _save_state(path: Path, distiller: Distiller, report: dict) -> None:
    taid = distiller.taid
    save_train_state(
        path,
        distiller.step_count,
        unique_state(distiller.student),
        distiller.optimizer,
        extra={
            "before": report.get("before", {}),
            "taid_t": taid.t,
            "taid_m": taid.momentum,
            "taid_prev": taid.prev_loss,
        },
    )


def _fmt(ev: dict) -> str:
    return ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ev.items() if k != "samples"
    )


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    report = run(cfg, run_dir)
    if report is None:
        return 0.0
    print("\n" + "=" * 72)
    print(f"run dir   : {run_dir}")
    print(f"before    : {_fmt(report.get('before', {}))}")
    print(f"after     : {_fmt(report['after'])}")
    if report.get("tokens_per_s"):
        print(f"throughput: {report['tokens_per_s']:.1f} trained tokens/s over {report['steps']} steps")
    print(f"checkpoint: {report['checkpoint']}")
    print("=" * 72)
    return float(report["after"].get("exact_match", 0.0))


if __name__ == "__main__":
    main()
