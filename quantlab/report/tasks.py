"""Multiple-choice tasks scored by log-likelihood: BIG-bench JSON tasks and MMLU-format CSV folders."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from quantlab.errors import InputError
from quantlab.report.metrics import excludes_zero, paired_diff_interval, wilson_interval

_LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class MCExample:
    """One question: the prompt, its choices (continuations) and the index of the right one."""

    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class MCTask:
    """A named list of multiple-choice examples and the file it came from."""

    name: str
    source: str
    examples: tuple[MCExample, ...]

    @property
    def chance(self) -> float:
        """Expected accuracy of a uniform guess."""
        return sum(1.0 / len(e.choices) for e in self.examples) / len(self.examples)


def load_tasks(paths: list[Path]) -> list[MCTask]:
    """BIG-bench task files (*.json) and MMLU folders (*.csv inside), in the order given."""
    tasks: list[MCTask] = []
    for p in paths:
        if p.is_dir():
            tasks.extend(load_mmlu(p))
        elif p.suffix == ".json":
            tasks.append(load_bigbench(p))
        elif p.suffix == ".csv":
            tasks.append(_mmlu_file(p))
        else:
            raise InputError(
                f"Task {p}: not found or of an unknown kind. Pass a BIG-bench task .json, an "
                "MMLU-format .csv file, or a folder of them."
            )
    return tasks


def load_bigbench(path: Path) -> MCTask:
    """A BIG-bench JSON task: examples with `input` and `target_scores`, prompted as BIG-bench does.

    Prompt: task_prefix + example_input_prefix ("\\nQ: ") + input (+ "\\n  choice: X" per choice when
    append_choices_to_input, BIG-bench's default) + example_output_prefix ("\\nA: "); each choice
    is a continuation.
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"Task {path} cannot be read as JSON ({exc}).") from None
    raw = doc.get("examples") if isinstance(doc, dict) else None
    if not isinstance(raw, list) or not raw:
        raise InputError(f"Task {path} has no `examples` list: it is not a BIG-bench task file.")
    prefix = str(doc.get("task_prefix") or "")
    q_prefix = str(doc.get("example_input_prefix", "\nQ: "))
    a_prefix = str(doc.get("example_output_prefix", "\nA: "))
    append = doc.get("append_choices_to_input", True) is not False
    choice_prefix = str(doc.get("choice_prefix", "\n  choice: "))
    examples = []
    for i, ex in enumerate(raw):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(scores, dict) or len(scores) < 2 or "input" not in ex:
            raise InputError(
                f"Task {path}, example {i}: no `input` and `target_scores` with two or more "
                "choices. quantlab scores multiple-choice tasks only; this one is generative."
            )
        choices = tuple(str(c) for c in scores)
        best = max(scores.values())
        if best <= 0:
            raise InputError(f"Task {path}, example {i}: no choice has a positive target score.")
        body = str(ex["input"]) + (choice_prefix + choice_prefix.join(choices) if append else "")
        examples.append(
            MCExample(
                prefix + q_prefix + body + a_prefix, choices, list(scores.values()).index(best)
            )
        )
    return MCTask(str(doc.get("name") or path.stem), str(path), tuple(examples))


def load_mmlu(folder: Path) -> list[MCTask]:
    """One task per `<subject>_test.csv` (or any *.csv) in folder: question, A, B, C, D, answer rows."""
    files = sorted(folder.glob("*_test.csv")) or sorted(folder.glob("*.csv"))
    if not files:
        raise InputError(
            f"MMLU folder {folder} has no *_test.csv or *.csv files (rows: question, A, B, C, D, answer)."
        )
    return [_mmlu_file(f) for f in files]


def _mmlu_file(path: Path) -> MCTask:
    subject = path.stem.removesuffix("_test")
    head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    examples = []
    with path.open(newline="", encoding="utf-8") as fh:
        for i, row in enumerate(csv.reader(fh)):
            if len(row) != 6 or row[5].strip() not in _LETTERS:
                raise InputError(
                    f"{path}, row {i + 1}: expected 6 columns (question, A, B, C, D, answer letter), "
                    f"got {len(row)} columns ending in {row[-1:]!r}: not an MMLU-format file."
                )
            q = row[0] + "".join(f"\n{ltr}. {t}" for ltr, t in zip(_LETTERS, row[1:5], strict=True))
            examples.append(
                MCExample(
                    head + q + "\nAnswer:",
                    tuple(f" {x}" for x in _LETTERS),
                    "ABCD".index(row[5].strip()),
                )
            )
    if not examples:
        raise InputError(f"{path} has no rows.")
    return MCTask(f"mmlu/{subject}", str(path), tuple(examples))


@dataclass
class MCScores:
    """Per-example log-likelihoods of every choice and the correctness vectors."""

    loglik: list[list[float]]
    correct: torch.Tensor  # [n] float64, 1.0 where argmax log-likelihood is the gold choice
    correct_norm: (
        torch.Tensor
    )  # [n] float64, same after dividing by the choice's length in characters


@torch.no_grad()
def score_task(
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    task: MCTask,
    bos_id: int | None,
    show_progress: bool = True,
) -> MCScores:
    """Log-likelihood of each choice given its context, one forward per (example, choice)."""
    device = next(model.parameters()).device
    lls: list[list[float]] = []
    acc, acc_n = [], []
    for ex in tqdm(task.examples, desc=f"task {task.name}", disable=not show_progress, leave=False):
        row = []
        for choice in ex.choices:
            ctx_ids, cont_ids = _encode_pair(tok, ex.context, choice, bos_id)
            ids = torch.tensor([ctx_ids + cont_ids], device=device)
            keep = len(cont_ids) + 1  # logits of the positions that predict the continuation
            out = model(input_ids=ids, use_cache=False, logits_to_keep=keep)
            logits = out.logits[0, :-1]
            lp = F.log_softmax(logits.float(), dim=-1)
            row.append(float(lp.gather(1, torch.tensor(cont_ids, device=device)[:, None]).sum()))
        lls.append(row)
        lens = [max(1, len(c)) for c in ex.choices]
        acc.append(float(max(range(len(row)), key=row.__getitem__) == ex.gold))
        normed = [v / n for v, n in zip(row, lens, strict=True)]
        acc_n.append(float(max(range(len(row)), key=normed.__getitem__) == ex.gold))
    return MCScores(
        lls, torch.tensor(acc, dtype=torch.float64), torch.tensor(acc_n, dtype=torch.float64)
    )


def _encode_pair(
    tok: PreTrainedTokenizerBase, context: str, choice: str, bos_id: int | None
) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): the whole text is encoded once and split where the context ends.

    Trailing spaces of the context move to the continuation (as lm-eval does), so a choice is never
    scored as a lone-space token.
    """
    stripped = context.rstrip(" ")
    cont = context[len(stripped) :] + choice
    whole = tok(stripped + cont, add_special_tokens=False)["input_ids"]
    ctx = tok(stripped, add_special_tokens=False)["input_ids"]
    n = len(ctx)
    while n > 0 and whole[:n] != ctx[:n]:
        n -= 1
    head = ([bos_id] if bos_id is not None else []) + list(whole[:n])
    tail = list(whole[n:])
    if not head or not tail:
        raise InputError(f"Choice {choice!r} tokenizes to nothing after its context.")
    return head, tail


def task_summary(task: MCTask, s: MCScores) -> dict[str, object]:
    """acc and acc_norm of one model with Wilson 95 % intervals."""
    n = len(task.examples)
    k, kn = int(s.correct.sum()), int(s.correct_norm.sum())
    return {
        "task": task.name,
        "source": task.source,
        "n": n,
        "chance": task.chance,
        "acc": k / n,
        "acc_ci": wilson_interval(k, n),
        "acc_norm": kn / n,
        "acc_norm_ci": wilson_interval(kn, n),
    }


def task_diff(task: MCTask, ref: MCScores, quant: MCScores) -> dict[str, object]:
    """The quantized model's acc / acc_norm, their difference to the reference and its paired interval."""
    out = task_summary(task, quant)
    for key, r, q in (
        ("acc", ref.correct, quant.correct),
        ("acc_norm", ref.correct_norm, quant.correct_norm),
    ):
        ci = paired_diff_interval(r, q)
        out[f"{key}_diff"] = float(q.mean() - r.mean())
        out[f"{key}_diff_ci"] = ci
        out[f"{key}_diff_significant"] = excludes_zero(ci)
    return out
