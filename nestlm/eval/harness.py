"""lm-evaluation-harness model backend ``nestlm``: every budget of a checkpoint, in place.

``NestlmLM`` subclasses the harness's ``TemplateLM``, so contexts and continuations are
tokenized exactly as its ``hf`` backend does (with transformers' tokenizer of the model
directory; a byte-level directory gets the same tokenizer ``export_hf`` writes), and
scores them with nestlm's own forward at the chosen budget: loglikelihood and rolling
loglikelihood on right-padded batches, generate-until on left-padded batches with stop
strings checked every step, the model directory's chat template when the run asks for it.

Written against lm-evaluation-harness 0.4.13 (pinned in pyproject's ``eval`` extra): the
harness finds model backends only in its own registry, which loads its built-in backends
only while empty, so ``register()`` imports ``lm_eval.models`` first and then adds ``nestlm``.

    nestlm eval --model DIR --budget all --tasks TASKS          # every budget from one load
    nestlm harness --model nestlm --model_args path=DIR,budget=6b --tasks TASKS
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import NestlmError

MISSING = (
    'lm-evaluation-harness is not installed; install it with: pip install -e ".[eval]" '
    '(or pip install "lm-eval>=0.4.13,<0.5")'
)

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError:
    raise NestlmError(MISSING) from None

DEFAULT_MAX_LENGTH = 4096  # transformers' NemotronHConfig default, what the hf backend reads from an export
LENGTH_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")  # as the hf backend looks them up
SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p", "seed")


class NestlmLM(TemplateLM):
    """The harness's view of one nestlm model at one budget.

    model_args: ``path`` (or ``pretrained``) = a model directory nestlm loads; ``budget`` =
    a frozen budget name (default: the full model); ``batch_size``; ``device`` (default
    cuda when present); ``dtype`` (float32, bfloat16, float16); ``max_length`` (default:
    the source config's, else 4096); ``tokenizer`` = another directory to take the
    tokenizer from; ``add_bos_token`` as in the hf backend.
    """

    def __init__(
        self,
        path: str | None = None,
        pretrained: str | None = None,
        budget: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_length: int | None = None,
        tokenizer: str | None = None,
        add_bos_token: bool | None = None,
        model: Any = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise NestlmError(
                f"unknown model_args {', '.join(sorted(unknown))} for --model nestlm; it takes path, budget, "
                "batch_size, device, dtype, max_length, tokenizer, add_bos_token"
            )
        from ..loading import load
        from ..tokenizer import load_hf_tokenizer

        path = path or pretrained
        if model is None and path is None:
            raise NestlmError("--model nestlm needs model_args path=DIR (a nestlm or Hugging Face model directory)")
        if model is None:
            model = load(path, dtype=_dtype(dtype))
        elif device is None:  # a model handed in stays where it is
            device = str(next(model.parameters()).device)
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # the harness CLI asks for cuda by default
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.path = str(path or model.source_dir)
        tok_dir = tokenizer or self.path
        self.tokenizer = load_hf_tokenizer(tok_dir)
        if self.tokenizer.pad_token_id is None:  # as the hf backend does
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.add_bos_token = _bool(add_bos_token)
        self.batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length else None
        self.set_budget(budget)

    # ------------------------------------------------------------ budget, sizes
    def set_budget(self, budget: str | None) -> None:
        """Run every following request at ``budget`` (None or "full" of a plain model: the model itself)."""
        budget = None if budget is None else str(budget)  # model_args parse budget=50 as the number 50
        if budget is not None and not self.model.budgets and budget == "full":
            budget = None
        try:
            self.arch = self.model.resolve_arch(budget=budget)
        except KeyError as e:
            raise NestlmError(e.args[0]) from None
        self.budget = budget

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        hf = self.model.config.hf_config or {}
        for key in LENGTH_KEYS:
            if isinstance(hf.get(key), int):
                return hf[key]
        return DEFAULT_MAX_LENGTH

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path or self.path).replace("/", "__")

    # ------------------------------------------------------------ tokenization
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """As the hf backend: the tokenizer's own special tokens unless told, none when the text starts with BOS."""
        kw: dict[str, Any] = {}
        if add_special_tokens is not None:
            kw["add_special_tokens"] = add_special_tokens
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        bos = self.tokenizer.decode(self.prefix_token_id) if self.prefix_token_id is not None else None
        if add_special_tokens is None and bos and string.startswith(bos):
            kw["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kw)
        left = kwargs.get("left_truncate_len")
        return ids[-left:] if left else ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.chat_template:
            raise NestlmError(
                f"the tokenizer of {self.path} has no chat template (chat_template.jinja or tokenizer_config.json's "
                "chat_template); run without --apply_chat_template"
            )
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # ------------------------------------------------------------ scoring
    @torch.inference_mode()
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding gives the continuation.

        Longest first, in right-padded batches (padding comes after every token that is
        scored, and the model is causal, so it changes nothing); contexts longer than
        max_length lose tokens on the left, as in the hf backend.
        """
        res: list[tuple[float, bool]] = []
        re_ord = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        pad = self.tokenizer.pad_token_id or 0
        for chunk in re_ord.get_batched(n=override_bs or self.batch_size):
            inps = []
            for _, ctx, cont in chunk:
                if not ctx or not cont:
                    raise NestlmError("a loglikelihood request has an empty context or continuation after tokenization")
                inps.append((ctx + cont)[-(self.max_length + 1) :][:-1])
            width = max(len(x) for x in inps)
            # the logits needed: row i scores its last len(cont) input positions
            need = max(width - len(x) + len(cont) for x, (_, _, cont) in zip(inps, chunk, strict=True))
            batch = torch.tensor([x + [pad] * (width - len(x)) for x in inps], dtype=torch.long, device=self.device)
            logits = self.model(batch, arch=self.arch, num_logits=need).logits  # (B, need, V), positions width-need..
            for (key, _, cont), x, row in zip(chunk, inps, logits, strict=True):
                end = len(x) - (width - need)  # index in row of the position after the last input token
                logp = F.log_softmax(row[end - len(cont) : end].float(), dim=-1)
                target = torch.tensor(cont, dtype=torch.long, device=self.device)
                greedy = bool((logp.argmax(-1) == target).all())
                answer = (float(logp.gather(-1, target[:, None]).sum()), greedy)
                res.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
        return re_ord.get_original(res)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of max_length, each with the most context,
        as the hf backend computes it."""
        windows: list[tuple[int, tuple[None, list[int], list[int]]]] = []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((i, (None, ctx, cont)))
        scores = self._loglikelihood_tokens([w for _, w in windows]) if windows else []
        totals = [0.0] * len(requests)
        for (i, _), (lp, _) in zip(windows, scores, strict=True):
            totals[i] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    @torch.inference_mode()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations, cut at the first stop string; batches of equal gen_kwargs, left-padded."""
        res: list[str] = []
        re_ords = Collator(
            [req.args for req in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False) if self.eot_token_id is not None else None
        for chunk in re_ords.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk, strict=True)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            kwargs.pop("max_length", None)
            unknown = sorted(set(kwargs) - set(SAMPLING_KWARGS))
            if unknown:
                raise NestlmError(
                    f"generation kwargs {', '.join(unknown)} are not supported by --model nestlm "
                    f"(it takes until, max_gen_toks, {', '.join(SAMPLING_KWARGS)})"
                )
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise NestlmError(f"max_gen_toks {max_gen} leaves no room for a prompt in max_length {self.max_length}")
            ids, mask = self._left_padded(list(contexts), max_ctx)
            do_sample = bool(kwargs.get("do_sample")) and float(kwargs.get("temperature", 1.0) or 0) > 0
            out = self.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=max_gen,
                do_sample=do_sample,
                temperature=float(kwargs.get("temperature", 1.0)) if do_sample else 1.0,
                top_k=kwargs.get("top_k") if do_sample else None,
                top_p=kwargs.get("top_p") if do_sample else None,
                seed=kwargs.get("seed"),
                arch=self.arch,
                pad_token_id=self.tokenizer.pad_token_id,
                stop=self._stopper(until),
            )
            for row, context, gen_kwargs in zip(out[:, ids.shape[1] :].tolist(), contexts, all_kwargs, strict=True):
                s = postprocess_generated_text(self.tok_decode(row), stop=until, think_end_token=None)
                res.append(s)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), s)
        return re_ords.get_original(res)

    def _left_padded(self, texts: list[str], max_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The hf backend's tok_batch_encode: left padding, special tokens as the tokenizer adds them."""
        kw: dict[str, Any] = {}
        bos = self.tokenizer.bos_token
        if bos and texts[0].startswith(bos):
            kw["add_special_tokens"] = False
        elif self.add_bos_token is not None:
            kw["add_special_tokens"] = self.add_bos_token
        old = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(texts, padding="longest", return_tensors="pt", **kw)
        finally:
            self.tokenizer.padding_side = old
        ids, mask = enc["input_ids"][:, -max_ctx:], enc["attention_mask"][:, -max_ctx:]
        return ids.to(self.device), mask.to(self.device)

    def _stopper(self, until: list[str]) -> Any:
        stops = [s for s in until if s]
        if not stops:
            return None

        def done(new: torch.Tensor) -> torch.Tensor:
            texts = self.tokenizer.batch_decode(new.tolist(), skip_special_tokens=True)
            return torch.tensor([any(s in t for s in stops) for t in texts], dtype=torch.bool)

        return done

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_num_parameters": self.model.num_parameters(arch=self.arch),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "budget": self.budget,
        }


def _dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "auto"):
        return None
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise NestlmError(f"dtype {name!r} is not one of {', '.join(table)} (or auto)")
    return table[name]


def _bool(v: Any) -> bool | None:
    if v is None or isinstance(v, bool):
        return v
    return str(v).lower() in ("1", "true", "yes")


def _batch_size(v: Any) -> int:
    """An int; the harness's "auto" (no detection here) becomes 16."""
    if v is None:
        return 1
    if isinstance(v, str) and v.startswith("auto"):
        return 16
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise NestlmError(f"batch_size {v!r} is not a whole number (or auto)") from None
    if n < 1:
        raise NestlmError(f"batch_size must be at least 1, got {n}")
    return n


def register() -> None:
    """Add ``nestlm`` to the harness's model registry, after its built-in backends."""
    import lm_eval.models  # noqa: F401  (the registry loads its own backends only while empty)
    from lm_eval.api.registry import model_registry

    model_registry.register("nestlm")(NestlmLM)
