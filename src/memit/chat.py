"""``memit chat``: a conversation with an (edited) model in its chat template, where facts can
be edited, undone and saved on the spot.

A `ChatSession` holds the model, its tokenizer, the conversation (user and assistant
turns) and the edits applied to the model: deltas loaded at the start (``--edits``) or an edit
chain (``--chain``), then the edits made in the chat, newest last. Answers are generated
greedily and streamed as they are generated. `ChatSession.compare` answers with the
unedited model: the same weights, the edits taken out for the answer and put back bit for bit
after it (never a second copy of the model). `chat_loop` is the terminal conversation
(its commands are in `HELP`).
"""
from __future__ import annotations

import contextlib
import logging
import shlex
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from memit.deltas import WeightDeltas, summed_deltas
from memit.editing.base import EditOptions
from memit.editing.hparams import HyperParams
from memit.errors import InputError, MemitError
from memit.requests import EditRequest, RequestError, check_tokenization, parse_request
from memit.utils.io import atomic_dir, memit_home

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128
STATS_LOGGER = "memit.stats.second_moment"

HELP = """\
Commands:
  /edit PROMPT SUBJECT TARGET  edit a fact now; {} in PROMPT marks the subject, e.g.
                               /edit "{} plays the sport of" "LeBron James" football
  /undo                        take the last edit made here back (the weights exactly as before it)
  /save DIR                    save the edits as one deltas folder (memit chat --edits DIR loads it)
  /reset                       forget the conversation (the edits stay)
  /help                        this list
  /quit                        leave (or Ctrl-D)
Anything else is a message to the model. Ctrl-C stops an answer."""


class ChatSession:
    """A conversation with ``model`` in its chat template, and the edits applied to it.

    ``loaded``: deltas already applied to ``model`` before the chat (oldest first); ``chain``:
    an `memit.chain.EditChain` on ``model`` (its batches applied), which new edits are
    appended to. Neither is taken back by `undo`, which reverts only edits made here.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        hparams: HyperParams | str | Path | None = None,
        algorithm: str = "MEMIT",
        options: EditOptions | None = None,
        loaded: Sequence[WeightDeltas] = (),
        chain: Any = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ):
        if not getattr(tok, "chat_template", None):
            raise InputError("chat: this model's tokenizer has no chat template")
        if chain is not None and loaded:
            raise InputError("chat: give loaded deltas or an edit chain, not both")
        self.model, self.tok, self.chain = model, tok, chain
        self.options = options or EditOptions()
        self.max_new_tokens = max_new_tokens
        self.history: list[dict[str, str]] = []
        self.loaded: list[WeightDeltas] = list(loaded)
        # The edits made in this chat, oldest first (for a chain: the batches appended).
        self.made: list[WeightDeltas] = []
        self.requests: list[EditRequest] = []
        if chain is None:
            from memit.editing.methods import resolve_hparams

            self.algorithm = algorithm
            self.hparams = resolve_hparams(algorithm, hparams, model)  # a bad --hparams fails now, not at /edit
        else:
            self.algorithm, self.hparams = chain.algorithm, chain.editor.hparams
        self._stats_computed = False
        # Where to say that an edit computes key statistics (chat_loop sets its output).
        self.notify: Callable[[str], None] = lambda text: print(text, flush=True)

    # -- the conversation ------------------------------------------------------------------

    @property
    def edited(self) -> bool:
        """Whether the model holds any edit (loaded, a chain's or made here)."""
        return bool(self.loaded or self.made or (self.chain is not None and len(self.chain)))

    def ask(self, text: str, stream_to: IO[str] | None = None) -> str:
        """The model's answer to ``text`` after the conversation so far, written to
        ``stream_to`` piece by piece as it is generated; both turns join the history."""
        answer = self._answer([*self.history, {"role": "user", "content": text}], stream_to)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    def compare(self, text: str, stream_to: IO[str] | None = None) -> str:
        """The unedited model's answer to ``text``, not added to the history. It follows the
        conversation before ``text``: when the history ends with ``text`` and its answer
        (`ask` was just called), that exchange is left out. The edits are taken out of
        the weights for the answer and put back, bit for bit, after it."""
        history = self.history
        if len(history) >= 2 and history[-2] == {"role": "user", "content": text} and history[-1]["role"] == "assistant":
            history = history[:-2]
        with self.unedited():
            return self._answer([*history, {"role": "user", "content": text}], stream_to)

    def reset(self) -> None:
        """Forget the conversation; the edits stay."""
        self.history = []

    @contextlib.contextmanager
    def unedited(self) -> Iterator[None]:
        """The model without any of its edits inside the block; every edit back, bit for bit, after it."""
        if self.chain is not None:
            with self.chain.unedited():
                yield
            return
        from memit.editing.common import replaced_weights
        from memit.editing.preserved import unedited_weights

        with replaced_weights(self.model, unedited_weights(self._applied())):
            yield

    def _answer(self, messages: list[dict[str, str]], stream_to: IO[str] | None) -> str:
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        batch = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        batch = {k: v.to(self.model.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        stop = threading.Event()

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in eos:
            eos.append(self.tok.eos_token_id)
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=eos or None,
            pad_token_id=self.tok.pad_token_id if self.tok.pad_token_id is not None else (eos[0] if eos else None),
        )
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**batch, generation_config=config, streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([_Stop()]))
            except BaseException as err:  # shown in the caller's thread
                failure.append(err)
                streamer.end()

        thread = threading.Thread(target=run, name="memit-chat-generate", daemon=True)
        thread.start()
        pieces: list[str] = []
        try:
            for piece in streamer:
                pieces.append(piece)
                if stream_to is not None:
                    stream_to.write(piece)
                    stream_to.flush()
        except KeyboardInterrupt:  # Ctrl-C: the answer so far
            stop.set()
            for piece in streamer:
                pieces.append(piece)
        finally:
            thread.join()
        if failure:
            raise failure[0]
        return "".join(pieces).strip()

    # -- edits -----------------------------------------------------------------------------

    def edit(self, prompt: str, subject: str, target: str) -> tuple[WeightDeltas, float]:
        """Edit the fact ``prompt`` (``{}`` where ``subject`` goes) -> ``target`` into the model
        on top of its edits; returns the applied deltas and the seconds the edit took. A bad
        request raises a `RequestError` naming the field, and leaves the model as it was."""
        request = chat_request(prompt, subject, target, self.tok)
        start = time.perf_counter()
        with self._reporting_statistics():
            if self.chain is not None:
                deltas = self.chain.edit([request])
            else:
                from memit.api import edit_model

                deltas = edit_model(self.model, self.tok, [request], self.hparams, self.algorithm,
                                    options=self.options, earlier=self._applied())
        seconds = time.perf_counter() - start
        self.made.append(deltas)
        self.requests.append(request)
        return deltas, seconds

    def undo(self) -> EditRequest | None:
        """Take the last edit made in this chat back (the weights exactly as before it);
        returns its request, or None when there is none to undo."""
        if not self.made:
            return None
        if self.chain is not None:
            self.chain.revert(1)
        else:
            self.made[-1].revert(self.model)
        self.made.pop()
        return self.requests.pop()

    def save(self, directory: str | Path) -> str:
        """Keep the edits: all the edits on the model (loaded and made here) as one deltas
        folder in ``directory``, or, for a chain, nothing to write (each batch is saved as it
        is made) unless ``directory`` is another folder, which gets the chain's total as one
        deltas folder. Returns what was done, in words."""
        directory = Path(directory)
        if self.chain is not None:
            if self.chain.directory is not None and directory.resolve() == self.chain.directory.resolve():
                return f"The chain in {directory} saves every edit as it is made ({len(self.chain)} batch(es))"
            if not len(self.chain):
                raise InputError("save: there are no edits to save")
            from memit.chain import chain_total

            total = chain_total(self.chain.directory)
            with atomic_dir(directory) as folder:
                total.save(folder)
            return f"Saved the chain's {len(self.chain)} batch(es) as one deltas folder in {directory} (the chain is in {self.chain.directory})"
        edits = self._applied()
        if not edits:
            raise InputError("save: there are no edits to save")
        deltas = edits[0] if len(edits) == 1 else combined(edits, self.model)
        with atomic_dir(directory) as folder:
            deltas.save(folder)
        return f"Saved {len(edits)} edit(s) ({len(deltas.manifest.get('requests') or [])} request(s)) to {directory}; load them with memit chat --edits {directory}"

    def _applied(self) -> list[WeightDeltas]:
        return [*self.loaded, *self.made] if self.chain is None else []

    @contextlib.contextmanager
    def _reporting_statistics(self) -> Iterator[None]:
        """Say so when an edit computes key statistics (minutes, the first time for a model)."""
        session = self
        stats_dir = self.options.stats_dir or memit_home() / "stats"

        class _Notice(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.getMessage().startswith("Computing key statistics") and not session._stats_computed:
                    session._stats_computed = True
                    session.notify(f"Computing key statistics for this model (the first edit only: minutes on a CPU; "
                                   f"cached in {stats_dir} afterwards)...")

        logger = logging.getLogger(STATS_LOGGER)
        handler, level = _Notice(logging.INFO), logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)


def chat_request(prompt: str, subject: str, target: str, tok: PreTrainedTokenizerBase | None = None) -> EditRequest:
    """The request of ``/edit PROMPT SUBJECT TARGET``, checked (a `RequestError` names
    the field). A prompt that spells the subject out instead of ``{}`` gets ``{}`` in its place."""
    if "{}" not in prompt and subject.strip():
        if prompt.count(subject) != 1:
            raise RequestError(f"field 'prompt': {prompt!r} has no '{{}}' to mark where the subject goes, "
                               f"and the subject {subject!r} is not in it once")
        prompt = prompt.replace(subject, "{}")
    try:
        request = parse_request({"prompt": prompt, "subject": subject, "target_new": target})
        if tok is not None:
            check_tokenization([request], tok)
    except RequestError as err:
        raise RequestError(str(err).removeprefix("request 0: ")) from None
    return request


def combined(edits: Sequence[WeightDeltas], model: PreTrainedModel) -> WeightDeltas:
    """Edits applied one after another as one `WeightDeltas`: the deltas summed (in
    float64), the requests in order, the keys kept for later edits joined."""
    from memit.editing.preserved import edit_gram, gram_name, keys_name
    from memit.models.loading import model_fingerprint

    state: dict[str, torch.Tensor] = {}
    layers = {int(key.rsplit("layer", 1)[1]) for edit in edits for key in edit.state if "layer" in key}
    for layer in sorted(layers):
        if all(keys_name(layer) in edit.state for edit in edits):
            keys = torch.cat([edit.state[keys_name(layer)] for edit in edits])
            if keys.shape[0] < keys.shape[1]:
                state[keys_name(layer)] = keys
                continue
        grams = [edit_gram(edit, layer) for edit in edits]
        if all(gram is not None for gram in grams):
            state[gram_name(layer)] = sum(grams[1:], grams[0])
    algorithms = list(dict.fromkeys(str(edit.manifest.get("algorithm")) for edit in edits))
    manifest = {
        "algorithm": algorithms[0] if len(algorithms) == 1 else "+".join(algorithms),
        "hparams": edits[-1].manifest.get("hparams", {}),
        "requests": [r for edit in edits for r in edit.manifest.get("requests") or []],
        "model_fingerprint": model_fingerprint(model),
        "model_name": getattr(model.config, "_name_or_path", ""),
        "combined_edits": len(edits),
    }
    return WeightDeltas(summed_deltas(edits), manifest, state)


def open_session(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    edits_dir: str | Path | None = None,
    chain_dir: str | Path | None = None,
    hparams: str | Path | None = None,
    algorithm: str | None = None,
    options: EditOptions | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> ChatSession:
    """A session on ``model`` with the deltas saved in ``edits_dir`` applied, or the edit
    chain in ``chain_dir`` loaded (a new one started there when it holds none)."""
    if not getattr(tok, "chat_template", None):
        raise InputError("chat: this model's tokenizer has no chat template")
    if edits_dir is not None and chain_dir is not None:
        raise InputError("chat: give --edits or --chain, not both")
    if chain_dir is not None:
        from memit.chain import CHAIN_FILE, EditChain

        if (Path(chain_dir) / CHAIN_FILE).is_file():
            if hparams is not None or algorithm is not None:
                raise InputError(f"chat: the chain in {chain_dir} edits with its own method and hyperparameters; drop --alg/--hparams")
            chain = EditChain.load(chain_dir, model, tok, options)
        else:
            chain = EditChain.start(model, tok, algorithm or "MEMIT", hparams, chain_dir, options)
        return ChatSession(model, tok, options=options, chain=chain, max_new_tokens=max_new_tokens)
    loaded = [WeightDeltas.load(edits_dir).apply(model)] if edits_dir is not None else []
    return ChatSession(model, tok, hparams, algorithm or "MEMIT", options, loaded, max_new_tokens=max_new_tokens)


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, out: IO[str] | None = None, compare: bool = False) -> None:
    """The conversation in the terminal: lines from ``read`` (EOF or /quit ends it), answers
    and command replies to ``out``."""
    import sys

    out = out or sys.stdout

    def say(text: str = "") -> None:
        out.write(text + "\n")
        out.flush()

    session.notify = say
    name = Path(str(getattr(session.model.config, "_name_or_path", "") or "the model")).name
    say(f"Chatting with {name} ({describe_edits(session)}). /help lists the commands.")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            say()
            return
        except KeyboardInterrupt:
            say("\n(/quit or Ctrl-D to leave)")
            continue
        if not line:
            continue
        if line.startswith("/"):
            if handle_command(session, line, say) is False:
                return
            continue
        if compare and session.edited:
            out.write("edited:   ")
            session.ask(line, out)
            say()
            out.write("unedited: ")
            session.compare(line, out)
            say()
        else:
            session.ask(line, out)
            say()


def handle_command(session: ChatSession, line: str, say: Callable[[str], None]) -> bool:
    """Run one ``/command`` line; False when the chat should end. Mistakes the user can fix
    (a `MemitError`) are answered with their one-line message."""
    try:
        words = shlex.split(line)
    except ValueError as err:  # unbalanced quotes
        say(f"Error: {err} (quote each of PROMPT, SUBJECT and TARGET that has spaces)" if line.startswith("/edit") else f"Error: {err}")
        return True
    command, args = words[0].lower(), words[1:]
    try:
        if command in ("/quit", "/exit", "/q"):
            return False
        if command == "/help":
            say(HELP)
        elif command == "/reset":
            session.reset()
            say("The conversation is forgotten; the edits stay.")
        elif command == "/edit":
            if len(args) != 3:
                raise InputError(f'/edit: needs PROMPT SUBJECT TARGET, got {len(args)} argument(s); e.g. /edit "{{}} plays the sport of" "LeBron James" football')
            try:
                _, seconds = session.edit(*args)
            except KeyboardInterrupt:
                say("Edit interrupted; the model is as it was.")
                return True
            request = session.requests[-1]
            say(f"Edited {request.filled_prompt()!r} -> {request.target_new.strip()!r} in {seconds:.1f} s "
                f"({session.algorithm}; {describe_edits(session)}; /undo takes it back)")
        elif command == "/undo":
            request = session.undo()
            if request is None:
                say("Nothing to undo: no edit was made in this chat" + (" (loaded edits stay)" if session.edited else "") + ".")
            else:
                say(f"Undid {request.filled_prompt()!r} -> {request.target_new.strip()!r} ({describe_edits(session)})")
        elif command == "/save":
            if len(args) != 1:
                raise InputError("/save: needs one folder, e.g. /save edits/lebron")
            say(session.save(args[0]))
        else:
            say(f"Unknown command {words[0]}; /help lists the commands.")
    except MemitError as err:
        say(f"Error: {err}")
    return True


def describe_edits(session: ChatSession) -> str:
    made = len(session.made)
    if session.chain is not None:
        return f"edit chain {session.chain.directory}: {len(session.chain)} batch(es), {made} made here"
    loaded = sum(len(d.manifest.get("requests") or []) or 1 for d in session.loaded)
    if not loaded and not made:
        return "unedited"
    return ", ".join(part for part in (f"{loaded} loaded edit(s)" if loaded else "", f"{made} edit(s) made here" if made else "") if part)


__all__ = ["DEFAULT_MAX_NEW_TOKENS", "HELP", "ChatSession", "chat_loop", "chat_request", "combined", "handle_command", "open_session"]
