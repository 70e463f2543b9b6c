"""A model backend for EleutherAI's lm-evaluation-harness (`lm-eval`), running a neoedge package.

GPT-Neo's published results (LAMBADA, HellaSwag, PIQA, Winogrande, perplexity) come from this
harness; with the backend, the package an app ships gets the same numbers:

    import lm_eval, neoedge.lm_eval_backend             # the import registers model "neoedge"
    results = lm_eval.simple_evaluate(model="neoedge", model_args="package=gpt-neo-125m-int4",
                                      tasks=["lambada_openai", "hellaswag"])

or `neoedge eval PKG --tasks ...`. Needs the [eval] extra (lm-eval, which needs no torch). Only this
module imports lm_eval: the runtime never does.

How requests run:
- loglikelihood: the harness's own tokenization (TemplateLM: the whole string encoded, then split
  at the context's length; the context's trailing whitespace moved into the continuation), then
  `neoedge.loglikelihood.score_pairs`: one pass over each distinct context, its continuations
  scored from its cache.
- loglikelihood_rolling: the harness's own windows (lm_eval.utils.get_rolling_token_windows and
  make_disjoint_window, as its Hugging Face backend makes them), scored the same way.
- generate_until: every request goes to one continuous-batching Engine (`batch_size` rows), with
  its own options: `until` as stop strings (plus <|endoftext|>), `max_gen_toks`, greedy unless the
  task samples (`do_sample`, `temperature`, `top_p`, `top_k`, `repetition_penalty`).

lm-eval 0.4.13 finds models only in its own registry (no plugin entry points), so something must
import this module first: `neoedge eval` and `neoedge-lm-eval` (lm-eval's own command line with
the backend registered) do it for you.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence as Seq
from pathlib import Path
from typing import Any

try:
    # Loading lm_eval.models registers the harness's own backends. It must happen before ours is
    # registered: lm-eval fills an empty registry on first lookup only, so registering "neoedge"
    # into an empty one would hide "hf" and the rest.
    import lm_eval.models  # noqa: F401
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as exc:  # pragma: no cover - exercised by the CLI test without lm-eval
    raise ImportError(f"the lm-eval backend needs the [eval] extra ({exc.name or exc} is missing): "
                      "pip install 'neoedge[eval]'") from exc
from tqdm.auto import tqdm

from .engine import Engine, EngineSettings
from .errors import NeoedgeError
from .loglikelihood import score_pairs
from .model import Model
from .options import GenerationOptions
from .session import SessionSettings

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"
"""neoedge's offline tasks (tag `stdlib`): pass it as lm-eval's include_path."""

DEFAULT_BATCH = 8
"""Rows of the generation engine when the harness asks for batch_size "auto"."""

_SAMPLING_ARGS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")


class HarnessError(NeoedgeError, ValueError):
    """A setting or a request the backend cannot honour (it says which, never guesses)."""


@register_model("neoedge")
class NeoedgeLM(TemplateLM):
    """lm-eval's `LM` interface over a neoedge Model. Model arguments (`--model_args k=v,...`):

    package (or pretrained): the package directory (or, from Python, a loaded `Model`).
    threads: onnxruntime intra-op threads (0: one per physical core). spinning: keep them spinning.
    max_length: window for scoring and generation (default: the model's context).
    max_gen_toks: generation length when a task sets none (default 256, as the hf backend).
    seed: base seed of sampled generations (request i uses seed + i), so runs are reproducible.
    verify: "auto" (hash what has no verified stamp) or "full" (hash every file now).
    batch_size / max_batch_size / device: as lm-eval passes them (neoedge runs on the CPU whatever
    the device says).
    """

    def __init__(self, package: str | os.PathLike[str] | Model | None = None, *,
                 pretrained: str | os.PathLike[str] | Model | None = None, batch_size: int | str | None = 1,
                 max_batch_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 threads: int = 0, spinning: bool = True, seed: int = 1234, device: str | None = None,
                 verify: str = "auto", **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise HarnessError(f"unknown model argument(s) for neoedge: {', '.join(sorted(unknown))} (known: "
                               "package, threads, spinning, max_length, max_gen_toks, seed, batch_size, verify)")
        if package is not None and pretrained is not None:
            raise HarnessError("give the package once: package=... or pretrained=..., not both")
        source = package if package is not None else pretrained
        if source is None:
            raise HarnessError("the neoedge backend needs package=PATH (a directory written by neoedge export)")
        if device is not None and not str(device).startswith("cpu"):
            # lm-eval's command line passes device="cuda:0" unless told otherwise; its hf backend then
            # falls back to the CPU too. Say so rather than refuse the harness's own default.
            log.warning("neoedge runs on the CPU: ignoring device=%s", device)
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 1:
            raise HarnessError(f"max_gen_toks must be an integer >= 1, got {max_gen_toks!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise HarnessError(f"seed must be an integer >= 0, got {seed!r}")
        self._max_gen_toks, self._seed = max_gen_toks, seed
        self._batch_size = _batch_size(batch_size, max_batch_size)
        if isinstance(source, Model):
            if (threads, spinning, verify) != (0, True, "auto"):
                raise HarnessError("threads, spinning and verify apply when the backend loads the package; "
                                   "this Model is loaded already (set them in its SessionSettings)")
            self.model = source
        else:
            self.model = Model(source, settings=SessionSettings(intra_threads=threads, spinning=spinning),
                               verify=verify)
        context = self.model.info.context_length
        if max_length is not None and not (isinstance(max_length, int) and 1 <= max_length <= context):
            raise HarnessError(f"max_length must be an integer between 1 and the model's context ({context}), "
                               f"got {max_length!r}")
        self._max_length = max_length or context

    # -- what the harness asks about the model ---------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.model.info.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # What an empty context and the first rolling window condition on: GPT-Neo's <|endoftext|>.
        return self.model.info.bos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.package_dir)

    def get_model_info(self) -> dict[str, Any]:
        manifest = self.model.manifest
        return {"neoedge_package": str(self.model.package_dir), "neoedge_fingerprint": self.model.fingerprint,
                "quantization": manifest.quantization.scheme, "model_source": self.model.info.source}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # GPT-Neo's tokenizer adds no special tokens either way (add_special_tokens changes nothing).
        # Unbounded: the harness tokenizes whole documents and cuts its own windows from them.
        return self.model.tokenizer.encode(string, what="lm-eval text")

    def tok_decode(self, tokens: Seq[int], **kwargs: Any) -> str:
        return self.model.decode(list(tokens))

    # -- log-likelihoods -------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        with tqdm(total=len(requests), desc="neoedge loglikelihood", disable=disable_tqdm) as bar:
            def scored(index: int, score: Any) -> None:
                bar.update(1)
                key = requests[index][0]
                if key is not None:  # rolling windows have none: their document is cached whole
                    self.cache_hook.add_partial("loglikelihood", key, (score.total, score.greedy))

            scores = score_pairs(self.model, [(context, continuation) for _, context, continuation in requests],
                                 max_length=self.max_length, batch_size=self.batch_size, on_scored=scored)
        return [(score.total, score.greedy) for score in scores]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[tuple[None, list[int], list[int]]] = []
        owners: list[int] = []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        eos_text = self.tok_decode([self.eot_token_id])
        prepared = []
        for index, (context, gen_kwargs) in enumerate(request.args for request in requests):
            if not isinstance(gen_kwargs, dict):
                raise HarnessError(f"generation arguments must be a dict, got {type(gen_kwargs).__name__}")
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = kwargs.pop("max_gen_toks")
            room = self.max_length - max_gen_toks
            if room < 1:
                raise HarnessError(f"max_gen_toks ({max_gen_toks}) must be smaller than max_length "
                                   f"({self.max_length})")
            # The last `room` tokens of the context, as the hf backend's left truncation keeps.
            prepared.append((self.tok_encode(context)[-room:], self._options(kwargs, until, max_gen_toks, index),
                             until))
        results: list[str] = []
        settings = EngineSettings(max_batch=min(self.batch_size, len(prepared)), max_queue=len(prepared))
        with Engine(self.model, settings) as engine, \
                tqdm(total=len(requests), desc="neoedge generate_until", disable=disable_tqdm) as bar:
            submitted = [engine.submit(ids, options) for ids, options, _ in prepared]
            for request, pending, (_, _, until) in zip(requests, submitted, prepared):
                text = postprocess_generated_text(pending.result().text, until, None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", request.args, text)
                bar.update(1)
        return results

    def _options(self, kwargs: dict[str, Any], until: list[str], max_gen_toks: int, index: int) -> GenerationOptions:
        """The harness's generation arguments (already normalized by lm-eval) as neoedge options."""
        if kwargs.get("num_beams", 1) == 1:
            kwargs.pop("num_beams", None)
        unsupported = sorted(set(kwargs) - set(_SAMPLING_ARGS))
        if unsupported:
            raise HarnessError(f"unsupported generation argument(s): {', '.join(unsupported)} (neoedge supports "
                               f"until, max_gen_toks, {', '.join(_SAMPLING_ARGS)})")
        sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 1.0 if sample else 0.0))
        if sample and temperature == 0.0:
            raise HarnessError("do_sample=True needs a temperature > 0 (temperature 0 is greedy: set do_sample=False)")
        seed = kwargs.get("seed")
        return GenerationOptions(
            max_new_tokens=max_gen_toks, temperature=temperature if sample else 0.0,
            top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
            repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
            seed=(int(seed) if seed is not None else self._seed + index) if sample else None,
            # An empty stop string means "none" to the harness (it skips them too).
            stop=tuple(text for text in until if text), stop_at_eos=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        raise HarnessError("GPT-Neo has no chat template: run tasks without --apply_chat_template")


def _batch_size(value: int | str | None, maximum: int | None) -> int:
    if value is None:
        return 1
    if isinstance(value, str) and value.startswith("auto"):
        # CPU memory is not the limit "auto" probes for on GPUs: a fixed number of engine rows.
        chosen = min(DEFAULT_BATCH, maximum) if maximum else DEFAULT_BATCH
        log.info("batch_size %s: using %d", value, chosen)
        return chosen
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise HarnessError(f"batch_size must be an integer or 'auto', got {value!r}") from None
    if size < 1:
        raise HarnessError(f"batch_size must be >= 1, got {size}")
    return size


def task_manager(include_path: Seq[str | os.PathLike[str]] = (), *, include_defaults: bool = True) -> Any:
    """lm-eval's TaskManager with neoedge's offline tasks (and any other task directories) added.
    include_defaults=False leaves out lm-eval's own ~15,000 tasks, which take seconds to index."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + [str(p) for p in include_path]
    for path in paths[1:]:
        if not Path(path).is_dir():
            raise HarnessError(f"task directory not found: {path}")
    return TaskManager(include_path=paths, include_defaults=include_defaults)


def evaluate(model: Model | str | os.PathLike[str], tasks: Seq[str], *, include_path: Seq[str | os.PathLike[str]] = (),
             limit: int | float | None = None, batch_size: int | str = 1, num_fewshot: int | None = None,
             log_samples: bool = False, bootstrap_iters: int = 100_000, include_defaults: bool = True,
             **model_args: Any) -> dict[str, Any]:
    """Run lm-eval tasks on a package (or a loaded Model); lm-eval's results dictionary.
    bootstrap_iters: resamples for the standard errors (lm-eval's default; 0 skips them)."""
    from lm_eval import simple_evaluate

    if not tasks:
        raise HarnessError("no tasks given")
    # Indexing lm-eval's own tasks takes seconds: only when a task is not among the local ones.
    manager = task_manager(include_path, include_defaults=False)
    if include_defaults and any(t not in manager.all_tasks and not Path(t).exists() for t in tasks):
        manager = task_manager(include_path)
    missing = [t for t in tasks if t not in manager.all_tasks and not Path(t).exists()]
    if missing:
        raise HarnessError(f"unknown task(s): {', '.join(missing)} (neoedge's offline tasks: "
                           f"{', '.join(sorted(offline_tasks(manager)))}; add --include-path DIR for your own)")
    lm = NeoedgeLM(model, batch_size=batch_size, **model_args)
    results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit,
                              num_fewshot=num_fewshot, log_samples=log_samples, bootstrap_iters=bootstrap_iters)
    assert results is not None  # only ranks other than 0 of a distributed run get None
    return results


def offline_tasks(manager: Any) -> list[str]:
    return [name for name in manager.all_tasks if name.startswith("stdlib")]


def results_table(results: dict[str, Any]) -> str:
    """The harness's own results table (and its groups table, if any)."""
    table = lm_utils.make_table(results)
    if "groups" in results:
        table += "\n" + lm_utils.make_table(results, "groups")
    return table


def main() -> None:
    """`neoedge-lm-eval`: lm-eval's own command line, with model "neoedge" registered and neoedge's
    offline tasks on the task path (unless `--include_path` names another directory: lm-eval takes
    one; neoedge's tasks are then reachable as `--tasks <TASKS_DIR>/stdlib_cloze.yaml`)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:]
    asks_help = not argv or any(a in ("-h", "--help") for a in argv)
    if not asks_help and not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = [sys.argv[0]] + argv
    cli_evaluate()


__all__ = ["HarnessError", "NeoedgeLM", "TASKS_DIR", "evaluate", "results_table", "task_manager"]
