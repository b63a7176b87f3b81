"""The inference engine: load a model once, then text in, text out.

Between "a run directory" and the decode loop (``generate.py``) sits what every user of a
model needs and should not write again: the model on its device (on a CPU, with its weights
laid out for decoding), its tokenizer, prompt text turned into token ids with errors that name
the prompt, and the sampling settings only the tokenizer knows (its end-of-text id, the ids it
can decode). :class:`Engine` holds them, so that ``llmscratch generate``, a chat loop, a server
and the samples printed during training all go through the same code.

The decoding itself stays in ``generate.py`` and is only fed from here: batches of prompts of
different lengths (left-padded), one seeded generator per row (row ``i`` samples with
``seed + i``, so a row gets the tokens its prompt gets alone with that seed), prompts longer
than the context (the window rule keeps their last half-context), stop strings and text
streamed without half a character or any of a stop string.

```
engine = Engine.load("runs/latest")                       # or Engine(model, tokenizer)
engine.complete(["And God said", "In the"], SamplingConfig(max_new_tokens=50, seed=7))
for piece in engine.stream("And God said", SamplingConfig(stop=("\\n",))):
    print(piece, end="", flush=True)
```
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence, Union

import torch

from ..data.tokenizer import Tokenizer
from ..errors import ConfigError, LLMScratchError, TokenizerError
from ..files import PathLike
from ..nn.model import GPT
from ..runtime import setup_runtime
from ..store.checkpoint import load_run
from .generate import SamplingConfig, choose_weight_layout, decodable_limit, generate_text, stream_text
from .generate import generate as generate_ids

# A prompt is text, or token ids already encoded (by this engine's tokenizer), as the OpenAI
# completions API also takes them: a caller that cut a prompt to the context keeps its ids.
Prompt = Union[str, Sequence[int]]


def prompt_label(text: str, width: int = 30) -> str:
    """How an error names a prompt: its ``repr``, cut to ``width`` characters with ``...``."""
    return repr(text) if len(text) <= width else f"{text[:width - 3]!r}..."


class Engine:
    """A model and its tokenizer, loaded once: prompts in, text (or token ids) out.

    Each decoding method takes a :class:`SamplingConfig` for the request and completes it with
    what the tokenizer decides (:meth:`sampling_for`): the end-of-text token ends a row (unless
    ``ignore_eos``) and ids the tokenizer cannot decode are never drawn. Several prompts decode
    as one batch, row ``i`` sampling with ``sampling.seed + i``.

    Attributes:
        model: the GPT (the decode loop puts it in eval mode while it runs, then restores its mode).
        tokenizer: the tokenizer that turns prompts into ids and ids into text.
        use_cache: decode with a KV cache (the same tokens; ``False`` recomputes the window each step).
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, *, use_cache: bool = True) -> None:
        """An engine over a model already in memory (the one being trained, or one loaded elsewhere).

        The weights are used as they are: nothing is copied, moved or laid out, so training can
        go on after a sample. :meth:`load` is the way in from a run directory.
        """
        self.model = model
        self.tokenizer = tokenizer
        self.use_cache = use_cache

    @classmethod
    def load(cls, run_dir: PathLike, device: str = "auto", *, use_cache: bool = True, rows: int = 1,
             purpose: str = "the prompt") -> "Engine":
        """The model and tokenizer of a run directory (from ``llmscratch train`` or ``llmscratch import``).

        ``device``: ``auto``, ``cpu``, ``cuda`` or ``mps``, resolved by ``runtime.setup_runtime``
        (float32 on a CPU). A run without tokenizer files raises the store's
        :class:`errors.CheckpointError`, which says where the files come from and names the text
        that needed them by ``purpose`` ("the prompt"; ``llmscratch explain --run`` passes "the
        sentence to trace", ``llmscratch attention`` "the prompt to draw"). With
        ``use_cache`` on a CPU, each shape of weight matrix is stored the way this CPU multiplies
        it fastest for batches of ``rows`` rows (:func:`generate.choose_weight_layout`: timed,
        the same values, about a second for gpt2-124m); elsewhere the weights are left alone.
        """
        runtime = setup_runtime(device, "fp32" if device in (None, "auto", "cpu") else "auto")
        model, tokenizer, _ = load_run(run_dir, device=runtime.device, need_tokenizer=purpose)
        if use_cache:
            choose_weight_layout(model, rows=rows)
        return cls(model, tokenizer, use_cache=use_cache)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (and so where decoding runs)."""
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        """The most tokens the model sees at once; longer prompts keep their last half of it."""
        return self.model.cfg.context_length

    @property
    def start_ids(self) -> list[int]:
        """What an empty prompt starts from: the beginning-of-text token of a tokenizer that has one
        (Llama's), else the end-of-text token (token 0 for a tokenizer without one), as GPT-2's
        unconditional samples start."""
        bos = getattr(self.tokenizer, "bos_id", None)
        if bos is not None:
            return [bos]
        return [self.tokenizer.eot_id if self.tokenizer.eot_id is not None else 0]

    def encode(self, prompts: Sequence[Prompt], names: Optional[Sequence[str]] = None) -> list[list[int]]:
        """Each prompt as token ids; an empty one as :attr:`start_ids`.

        Text the tokenizer cannot encode (characters a character tokenizer never saw) raises
        :class:`errors.TokenizerError` naming the prompt by ``names[i]`` (default: the text,
        shortened), with its number when there are several. Token ids are taken as they are
        (the decode loop checks that they are in the model's vocabulary).
        """
        if isinstance(prompts, str):  # one string is one prompt, not one prompt per character
            prompts = [prompts]
        if names is not None and len(names) != len(prompts):
            raise ConfigError(f"Engine.encode got {len(names)} names for {len(prompts)} prompts; give one per prompt")
        encoded = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                encoded.append(list(prompt) or self.start_ids)
                continue
            try:
                encoded.append(self.tokenizer.prompt_ids(prompt) or self.start_ids)
            except LLMScratchError as err:
                name = names[i] if names is not None else prompt_label(prompt)
                number = f" (prompt {i + 1})" if len(prompts) > 1 else ""
                raise TokenizerError(f"{name}{number}: {err}; leave those characters out") from None
        return encoded

    def sampling_for(self, sampling: SamplingConfig, ignore_eos: bool = False) -> SamplingConfig:
        """``sampling`` with the tokenizer's part filled in.

        ``eos_id``: the one given, else the tokenizer's end-of-text token; ``stop_ids``: the
        tokenizer's other end-of-turn ids (a chat model's ``<|im_end|>``); both ``None`` with
        ``ignore_eos`` (every row runs to ``max_new_tokens`` or a stop string). ``vocab_limit``:
        never an id the tokenizer cannot decode (a model whose vocabulary is padded past its
        tokenizer's, as nanoGPT's 50,304 for GPT-2's 50,257), nor one past the limit given.
        """
        limit = decodable_limit(self.tokenizer.vocab_size, self.model.cfg.vocab_size)
        if sampling.vocab_limit is not None:
            limit = sampling.vocab_limit if limit is None else min(limit, sampling.vocab_limit)
        eos_id = None if ignore_eos else sampling.eos_id if sampling.eos_id is not None else self.tokenizer.eot_id
        stop_ids = () if ignore_eos else tuple(dict.fromkeys(
            sampling.stop_ids + tuple(getattr(self.tokenizer, "stop_ids", ()) or ())))
        return dataclasses.replace(sampling, eos_id=eos_id, stop_ids=stop_ids, vocab_limit=limit)

    def _rows(self, prompts: Sequence[Prompt], samples: int, names: Optional[Sequence[str]]) -> list[list[int]]:
        """One row of ids per prompt and sample, prompt by prompt (row ``i`` samples with seed + ``i``)."""
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ConfigError(f"samples (how many completions of each prompt) must be an integer >= 1, got {samples!r}")
        return [ids for ids in self.encode(prompts, names) for _ in range(samples)]

    def complete(self, prompts: Sequence[Prompt], sampling: SamplingConfig, *, samples: int = 1,
                 names: Optional[Sequence[str]] = None, ignore_eos: bool = False) -> list[str]:
        """The new text after each prompt (without the prompt), decoded as one batch.

        ``samples`` completions of each prompt, prompt by prompt: completion ``i`` is row ``i``
        and samples with ``sampling.seed + i``, so it is what that prompt completes alone with
        that seed. Each text ends at the end-of-text token, ``max_new_tokens`` or just before its
        first stop string (``sampling.stop``), on its own. ``names``: how errors name the prompts
        (:meth:`encode`).
        """
        rows = self._rows(prompts, samples, names)
        return generate_text(self.model, rows, self.sampling_for(sampling, ignore_eos), self.tokenizer.decode,
                             use_cache=self.use_cache)

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingConfig, *, samples: int = 1,
                 names: Optional[Sequence[str]] = None, ignore_eos: bool = False) -> list[list[int]]:
        """The new token ids of each row, as :meth:`complete` orders them (no stop strings: they cut
        text, which may end inside a token). For a caller that decodes the ids itself, together
        with the prompt's (the samples printed during training)."""
        rows = self._rows(prompts, samples, names)
        return generate_ids(self.model, rows, self.sampling_for(sampling, ignore_eos), use_cache=self.use_cache)

    def stream(self, prompt: Prompt, sampling: SamplingConfig, *, name: Optional[str] = None,
               ignore_eos: bool = False) -> Iterator[str]:
        """The new text of one prompt in pieces, each as soon as it is safe to show.

        A piece never holds half of a multi-byte character (a byte-level tokenizer may split one
        across tokens) nor any of a stop string, even one still forming; the pieces add up to
        :meth:`complete`'s text for the same request. The prompt is encoded now, so a prompt
        that cannot be encoded raises here, before anything is shown; the decoding runs as the
        iterator is read.
        """
        ids = self.encode([prompt], None if name is None else [name])[0]
        return stream_text(self.model, ids, self.sampling_for(sampling, ignore_eos), self.tokenizer.decode,
                           use_cache=self.use_cache)
