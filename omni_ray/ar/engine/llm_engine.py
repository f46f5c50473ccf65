"""The offline engine: requests in, steps of continuous batching, outputs out (nano-vllm's API).

    llm = LLM("tiny:qwen3", enforce_eager=True)
    outs = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))
    outs[0]["text"], outs[0]["token_ids"]

    llm.add_request("Hello", SamplingParams())       # or by hand, as nano-vllm's reference does
    while not llm.is_finished():
        outputs, num_tokens = llm.step()              # [(seq_id, token_ids) finished now], +prefill / -decode

``step()`` keeps nano-vllm's contract; the serving loop (``engine_core.CoreLoop``) calls
``step_seqs()``, which returns every sequence that changed. An exception inside a step fails
that step's sequences (``EngineError``, blocks freed) and leaves the engine serving the rest.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from omni_ray.ar.engine.block_manager import BlockManager
from omni_ray.ar.engine.detokenizer import find_stop, update_text
from omni_ray.ar.engine.scheduler import Scheduler
from omni_ray.ar.executor import make_executor
from omni_ray.ar.grammar import GrammarCompiler, SequenceGrammar
from omni_ray.ar.input_embeds import InputEmbeds
from omni_ray.ar.models import ArchConfig, arch_config
from omni_ray.ar.models.checkpoint import checkpoint_layout
from omni_ray.ar.models.loader import read_hf_config
from omni_ray.ar.multimodal import MultiModalInputs, MultiModalProcessor
from omni_ray.ar.multimodal.prompts import chat_inputs, data_inputs, has_media
from omni_ray.ar.sampling_params import EncodeParams, SamplingParams
from omni_ray.ar.sequence import SeqStatus, Sequence
from omni_ray.ar.structured_outputs import StructuredOutputsParams
from omni_ray.ar.worker.model_runner import needs_eager
from omni_ray.config import AREngineConfig, MediaConfig, ModelConfig
from omni_ray.errors import EngineError, InvalidRequestError, OmniError
from omni_ray.profiling import GcPauses
from omni_ray.rules import check_prompt

log = logging.getLogger(__name__)


def fit_max_model_len(cfg: AREngineConfig, arch: ArchConfig) -> AREngineConfig:
    """``cfg`` with ``max_model_len`` clamped to the model's positions (``max_position_embeddings``),
    with a warning naming both numbers, as nano-vllm and vLLM do: a longer context would index past
    the rotary tables inside a step."""
    asked = cfg.scheduler.max_model_len
    if asked <= arch.max_position:
        return cfg
    log.warning("max_model_len %d exceeds the model's max_position_embeddings %d; using %d",
                asked, arch.max_position, arch.max_position)
    sched = cfg.scheduler.model_copy(update={"max_model_len": arch.max_position})
    return cfg.model_copy(update={"scheduler": sched})


@dataclass
class EngineStats:
    steps: int = 0                     # host steps (schedule + run)
    forwards: int = 0                  # model forwards on the device (> steps with multi-step decode)
    prefill_tokens: int = 0
    decode_tokens: int = 0
    max_batch_size: int = 0
    decode_steps: int = 0
    decode_context_tokens: int = 0     # sum over decode rows of their context length (KV read)
    batch_size_hist: dict = field(default_factory=dict)


class LLMEngine:
    def __init__(self, model: str | ModelConfig | AREngineConfig, **kwargs):
        cfg = model if isinstance(model, AREngineConfig) else AREngineConfig.from_kwargs(model, **kwargs)
        self.layout = checkpoint_layout(cfg.model.path)     # which folders hold weights / tokenizer / processor
        self.model_path = self.layout.weights
        self.arch = arch_config(read_hf_config(self.model_path), cfg.model.submodel)
        self.config = cfg = fit_max_model_len(cfg, self.arch)
        self.tokenizer = self.layout.load_tokenizer()
        self.mm_processor = MultiModalProcessor.from_pretrained(self.layout, self.tokenizer)  # None: text only
        if self.mm_processor is None and self.layout.pipeline is not None and cfg.media_towers:
            # a pipeline's VL text encoder without an image processor (Qwen-Image): text only, so its
            # vision tower's weights are not loaded
            self.config = cfg = cfg.model_copy(update={"media_towers": False})
        self.runner = self._make_runner()
        self.eos_ids = set(self.arch.eos_token_ids)
        if self.tokenizer.eos_token_id is not None and self.arch.talker is None:   # the talker's are codec ids
            self.eos_ids.add(self.tokenizer.eos_token_id)
        # structured outputs: grammars compiled in threads against the model's vocabulary (omni_ray.ar.grammar)
        self.grammar = GrammarCompiler(self.tokenizer, self.arch.vocab_size, sorted(self.eos_ids),
                                       cfg.structured_outputs)
        self.input_event = threading.Event()    # set when streamed input rows arrive (InputEmbeds.on_input)
        self._reset()
        # profiling: one JSON line per step (wall-clock start, duration, batch, requests added since)
        self.step_log = open(cfg.step_log, "a", buffering=1) if cfg.step_log else None  # noqa: SIM115
        self.gc_pauses = GcPauses() if cfg.step_log else None        # collections during each step
        self._added = 0
        if cfg.warmup and self.runner.device.type == "cuda":
            self.warmup()

    def warmup(self) -> None:
        """Throw-away requests that take every path a real mix takes (one and many prompts of odd
        lengths in one prefill, mixed prefill + decode, multi-step and sampled decode, log-probs),
        so that torch.compile and Triton compile their variants now, not during the first burst
        of traffic (seen as a ~2 s stall). Engine state and counters are reset afterwards."""
        import random
        rng = random.Random(0)
        vocab = min(self.arch.vocab_size, 1000)
        # past the prefill / mixed-step graphs' largest bucket, so that the eager path compiles now too
        longest = max(1, min(max(300, self.config.mixed_graph_tokens + 1), self.max_model_len - 16))
        most = min(256, self.config.scheduler.max_num_seqs)       # bursts of short prompts, up to this
        greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_tokens=4, ignore_eos=True, seed=1)
        json_object = StructuredOutputsParams(json_object=True)       # the bitmask kernels compile now too
        text = self.arch.talker is None                               # the talker samples codec tokens
        constrained = [SamplingParams(temperature=t, max_tokens=4, structured_outputs=json_object) for t in (0.0, 0.8)]
        waves = [[(1, greedy)],
                 [(n, p) for n, p in ((7, greedy), (33, sampled), (min(130, longest), greedy),
                                      (longest, SamplingParams(temperature=0.0, max_tokens=3, logprobs=5)),
                                      *(((9, constrained[0]), (11, constrained[1])) if text else ()))],
                 *([(rng.randint(5, 40), greedy) for _ in range(b)] for b in sorted({
                     min(32, most), most, max(1, most // 2 + 3)}))]
        for i, wave in enumerate(waves):
            for j, (n, params) in enumerate(wave):
                self.add_request([rng.randrange(vocab) for _ in range(n)], params, f"warmup-{i}-{j}")
                if i == 1 and j == 0:
                    self.step_seqs()                  # the rest joins a running decode: a mixed batch
            while not self.is_finished():
                self.step_seqs()
        self._reset()

    def _reset(self) -> None:
        """Empty KV-cache bookkeeping (no prefix-cache entries), queues, counters and requests."""
        cfg = self.config
        self.block_manager = BlockManager(self.runner.num_blocks, cfg.cache.block_size, cfg.cache.enable_prefix_caching)
        lookahead = 2 * cfg.decode_steps - 1 if cfg.async_decode and cfg.decode_steps > 1 else 0
        encoders = getattr(self.runner, "encoders", None)
        self.scheduler = Scheduler(cfg.scheduler, self.block_manager, lookahead,
                                   encoder_cache=encoders.cache if encoders is not None else None)
        self.stats = EngineStats()
        self.seqs: dict[str, Sequence] = {}
        self.compiling: list[Sequence] = []     # structured outputs: waiting for their grammar (not scheduled yet)
        self._inflight: tuple | None = None     # async_decode: a launched decode run not yet landed

    def _make_runner(self):
        return make_executor(self.config, self.model_path, self.arch)

    @property
    def model_name(self) -> str:
        return self.config.model.served_name

    @property
    def max_model_len(self) -> int:
        return self.config.scheduler.max_model_len

    # ------------------------------------------------------------------ requests
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        check_prompt(prompt)
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise InvalidRequestError(f"token id {bad[0]} is outside the vocabulary [0, {self.arch.vocab_size})",
                                      param="prompt")
        return ids

    def process(self, prompt) -> str | list[int] | MultiModalInputs:
        """A prompt in any accepted shape -> text, token ids or a processed multimodal prompt: vLLM's
        dicts ``{"prompt": text, "multi_modal_data": {...}}`` / ``{"prompt_token_ids": [...]}`` too."""
        if not isinstance(prompt, dict):
            return prompt
        unknown = sorted(set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"})
        if unknown or ("prompt" in prompt) == ("prompt_token_ids" in prompt):
            raise InvalidRequestError("a prompt dict has 'prompt' (text) or 'prompt_token_ids', and optionally "
                                      f"'multi_modal_data'; got {sorted(prompt)}", param="prompt")
        data = prompt.get("multi_modal_data")
        if not data:
            return prompt.get("prompt", prompt.get("prompt_token_ids"))
        if self.mm_processor is None:
            raise InvalidRequestError(f"{self.model_name} takes text only; multi_modal_data is not accepted",
                                      param="multi_modal_data")
        return data_inputs(self.mm_processor, prompt.get("prompt"), data, MediaConfig())

    def make_sequence(self, prompt, params: SamplingParams | EncodeParams,
                      request_id: str | None = None) -> Sequence:
        """Validate and build a Sequence (raises InvalidRequestError, touches no engine state). ``prompt``:
        text, token ids, a ``MultiModalInputs`` or a vLLM prompt dict (``process``)."""
        embeds = self._input_embeds(prompt)
        prompt = embeds[0] if embeds is not None else self.process(prompt)
        mm = prompt if isinstance(prompt, MultiModalInputs) else None
        if mm is not None:
            if getattr(self.runner, "encoders", None) is None:
                raise InvalidRequestError("this engine runs no media encoders (multimodal prompts need "
                                          "tensor_parallel_size 1 for now)", param="multi_modal_data")
            self._check_embeddings(mm)
            prompt = mm.token_ids if mm.items else prompt.token_ids
            mm = mm if mm.items else None
        ids = self.tokenize(prompt)
        limit = self.max_model_len
        prompt_only = isinstance(params, EncodeParams) or getattr(params, "max_tokens", None) == 0
        if len(ids) > limit or (len(ids) == limit and not prompt_only):
            raise InvalidRequestError(f"prompt has {len(ids)} tokens; max_model_len is {limit}", param="prompt")
        if isinstance(params, SamplingParams):
            params.validate()
            if params.prompt_logprobs is not None and self.config.parallel.tensor_parallel_size > 1:
                raise InvalidRequestError("prompt_logprobs is not supported under tensor parallelism yet",
                                          param="prompt_logprobs")
            params = params.resolve_max_tokens(len(ids), limit)
            if len(ids) + params.max_tokens > limit:
                raise InvalidRequestError(
                    f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len "
                    f"({limit})", param="max_tokens")
        elif isinstance(params, EncodeParams):
            if params.layer is not None and not -self.arch.num_layers - 1 <= params.layer <= self.arch.num_layers:
                raise InvalidRequestError(f"layer must be in [-{self.arch.num_layers + 1}, {self.arch.num_layers}]",
                                          param="layer")
            drop = params.drop_tokens
            if isinstance(drop, bool) or not isinstance(drop, int) or drop < 0:
                raise InvalidRequestError(f"drop_tokens must be an integer >= 0, got {drop!r}", param="drop_tokens")
            if drop >= len(ids):
                raise InvalidRequestError(f"prompt has {len(ids)} tokens, none past the {drop} dropped ones",
                                          param="prompt")
        else:
            raise InvalidRequestError("params must be SamplingParams or EncodeParams")
        if request_id is not None and request_id in self.seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        grammar = None
        if isinstance(params, SamplingParams) and params.structured_outputs is not None and self.arch.talker:
            raise InvalidRequestError("structured outputs constrain text; this model samples speech codec tokens",
                                      param="structured_outputs")
        if isinstance(params, SamplingParams) and params.structured_outputs is not None:
            # the constraint's syntax is checked now (InvalidRequestError); it compiles in a thread
            grammar = SequenceGrammar(self.grammar, self.grammar.submit(params.structured_outputs))
        seq = Sequence(ids, params, request_id, self.config.cache.block_size, mm=mm,
                       input_embeds=embeds[1] if embeds is not None else None)
        seq.grammar = grammar
        if isinstance(params, SamplingParams) and params.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        return seq

    def _input_embeds(self, prompt) -> tuple[list[int], InputEmbeds] | None:
        """A prompt given as embeddings (``omni_ray/ar/input_embeds.py``): an ``InputEmbeds``, or vLLM's
        ``{"prompt_embeds": [L, E]}`` (a tensor or an ``InputEmbeds``; optionally with ``"prompt_token_ids"``,
        one per row, for models that read both) -> (token ids, rows); None for other prompts."""
        if isinstance(prompt, dict) and "prompt_embeds" in prompt:
            unknown = sorted(set(prompt) - {"prompt_embeds", "prompt_token_ids"})
            if unknown:
                raise InvalidRequestError(f"a prompt with 'prompt_embeds' takes only 'prompt_token_ids' beside it; "
                                          f"got {unknown}", param="prompt")
            embeds, ids = prompt["prompt_embeds"], prompt.get("prompt_token_ids")
            embeds = embeds if isinstance(embeds, InputEmbeds) else InputEmbeds(embeds)
        elif isinstance(prompt, InputEmbeds):
            embeds, ids = prompt, None
        else:
            return None
        if self.config.parallel.tensor_parallel_size > 1:
            raise InvalidRequestError("prompt embeddings are not supported under tensor parallelism yet",
                                      param="prompt_embeds")
        width = self.arch.input_size or self.arch.hidden_size
        if embeds.width != width:
            raise InvalidRequestError(f"prompt_embeds rows have width {embeds.width}; this model takes {width}",
                                      param="prompt_embeds")
        if embeds.positions is not None and self.arch.mrope_section is None:
            raise InvalidRequestError(f"{self.model_name} has no M-RoPE; positions are not accepted", param="positions")
        ids = list(ids) if ids is not None else [0] * len(embeds)
        if len(ids) != len(embeds):
            raise InvalidRequestError(f"prompt_token_ids has {len(ids)} ids for {len(embeds)} prompt_embeds rows",
                                      param="prompt_token_ids")
        return ids, embeds

    def _check_embeddings(self, mm: MultiModalInputs) -> None:
        """Media that come with their encoder output need its shape; without towers every item needs one."""
        towers = self.config.media_towers
        for i, it in enumerate(mm.items):
            if it.embedding is None:
                if not towers:
                    raise InvalidRequestError(
                        f"this engine loads no media encoders (media_towers is off: an encoder stage runs them) "
                        f"and {it.kind} item {i} came without its embedding", param="multi_modal_data")
                continue
            want = (it.length, self.arch.hidden_size)
            if tuple(it.embedding.shape) != want:
                raise InvalidRequestError(f"{it.kind} item {i}: embedding of shape {list(it.embedding.shape)}; "
                                          f"this model needs {list(want)}", param="multi_modal_data")

    def add_request(self, prompt: str | list[int], params: SamplingParams | EncodeParams | None = None,
                    request_id: str | None = None) -> Sequence:
        seq = self.make_sequence(prompt, params or SamplingParams(), request_id)
        self.add_sequence(seq)
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        self.seqs[seq.request_id] = seq
        if seq.input_embeds is not None and not seq.input_embeds.closed:
            seq.input_embeds.on_input = self.input_event.set        # streamed rows wake an idle loop
        if seq.grammar is not None:
            self.compiling.append(seq)              # scheduled once its grammar is compiled (_admit_compiled)
        else:
            self.scheduler.add(seq)
        self._added += 1

    def abort(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        if seq is None:
            seq = next((s for s in self.compiling if s.request_id == request_id), None)
            if seq is not None:
                self.compiling.remove(seq)
                seq.status, seq.finish_reason = SeqStatus.FINISHED, "abort"
        if seq is not None and seq.grammar is not None:
            seq.grammar.free()
        self.seqs.pop(request_id, None)
        return seq is not None

    def waits_for_input(self) -> bool:
        """Work is left, but only sequences waiting for their next input row (streamed ``InputEmbeds``):
        stepping is useless until a ``push`` / ``close`` sets ``input_event``."""
        sch = self.scheduler
        return (bool(sch.running) and not sch.waiting and not self.compiling and self._inflight is None
                and all(s.waits_for_input for s in sch.running))

    def is_finished(self) -> bool:
        return self._inflight is None and not self.scheduler.has_work() and not self.compiling

    def _admit_compiled(self) -> list[Sequence]:
        """Schedule the sequences whose grammar has compiled (in arrival order); one whose grammar
        failed to compile finishes with its error. Returns those that failed."""
        failed, still = [], []
        for seq in self.compiling:
            if not seq.grammar.ready:
                still.append(seq)
                continue
            try:
                seq.grammar.start()
            except OmniError as err:
                seq.error = err
                self._finish(seq, "error")
                failed.append(seq)
                continue
            self.scheduler.add(seq)
        self.compiling = still
        return failed

    # ------------------------------------------------------------------ health (tensor parallel: workers)
    def check_health(self) -> None:
        """Raises EngineError when the runner cannot work (a tensor-parallel rank died)."""
        check = getattr(self.runner, "check_health", None)
        if check is not None:
            check()

    def add_failure_callback(self, fn) -> None:
        """``fn(err)`` runs (from another thread) when the runner fails on its own, e.g. a worker died."""
        add = getattr(self.runner, "add_failure_callback", None)
        if add is not None:
            add(fn)

    def shutdown(self) -> None:
        """Release what the runner holds outside this process (tensor-parallel worker actors)."""
        stop = getattr(self.runner, "shutdown", None)
        if stop is not None:
            stop()
        if self.step_log is not None:
            self.step_log.close()
            self.gc_pauses.close()
            self.step_log = None
        self.grammar.shutdown()

    # ------------------------------------------------------------------ step
    def step(self) -> tuple[list[tuple[int, list[int]]], int]:
        """nano-vllm's step: ``(outputs, num_tokens)``, ``outputs`` the ``(seq_id, token_ids)`` of
        the sequences that finished in this step (their generated tokens), ``num_tokens`` the
        prompt tokens computed (> 0) when the step had a prefill, else minus the decode tokens.
        Raises ``EngineError`` when the step failed (its sequences are failed and freed; the
        engine goes on with the rest)."""
        p0, d0 = self.stats.prefill_tokens, self.stats.decode_tokens
        changed = self.step_seqs()
        failed = [s for s in changed if s.error is not None]
        if failed:
            raise EngineError(f"engine step failed for requests {[s.request_id for s in failed]}: "
                              f"{failed[0].error.message}")
        outputs = [(s.seq_id, s.output_token_ids) for s in changed if s.is_finished]
        prefill = self.stats.prefill_tokens - p0
        return outputs, prefill if prefill else -(self.stats.decode_tokens - d0)

    def step_seqs(self) -> list[Sequence]:
        """One forward of the next batch (the serving loop's step). Returns the sequences that
        changed (new token / finished; failed ones carry ``seq.error``). With ``async_decode``,
        a pure decode run is launched and, while the same batch can go on, the next run is queued
        on the device before this one's tokens are read: the host's work on a run (appending
        tokens, finishing sequences, the caller's outputs) overlaps the next."""
        batch = None
        failed = self._admit_compiled() if self.compiling else []
        if failed:
            return failed
        try:
            if self._inflight is not None:
                batch = self._inflight[0].batch
                return self._land()
            wall, t0 = time.time(), time.perf_counter()
            batch = self.scheduler.schedule()
            if not batch.seqs:
                self.last_step = (0, 0, 0, 0)
                if self.compiling:            # nothing to run but grammars compiling: wait a little for one
                    wait_futures([s.grammar.future for s in self.compiling], timeout=0.005,
                                 return_when=FIRST_COMPLETED)
                return []
            k = self._decode_steps(batch)
            self.last_step = (len(batch), batch.num_decodes, batch.num_tokens, k)    # for slow-step logs
            if self._overlaps(batch, k):
                self._inflight = (self.runner.launch_decode(batch, k), wall, t0, 0)
                return self._land()
            out = self.runner.run(batch, k) if k > 1 else self.runner.run(batch)
            return self._apply(batch, out, k, wall, t0)
        except Exception as err:  # noqa: BLE001 - this step's requests fail; the engine goes on
            return self._fail_step(batch, err)

    def _fail_step(self, batch, err: Exception) -> list[Sequence]:
        """Fail the sequences of a step that raised (all running ones when the batch is unknown):
        each finishes with reason "error" and ``seq.error``, its blocks freed; nothing is in flight."""
        log.exception("engine step failed; failing its requests")
        self._inflight = None
        seqs = batch.seqs if batch is not None and batch.seqs else list(self.scheduler.running)
        message = err.message if isinstance(err, EngineError) else f"engine step failed: {err!r}"
        failed = []
        for seq in seqs:
            if seq.is_finished:
                continue
            if seq in self.scheduler.waiting:           # preempted within the step
                self.scheduler.waiting.remove(seq)
            seq.error = EngineError(message)            # one per request: each caller raises its own
            self._finish(seq, "error")
            failed.append(seq)
        return failed

    def _overlaps(self, batch, k: int) -> bool:
        """A multi-step run (k > 1: a pure-decode batch, ``_decode_steps``) on one rank, of
        a batch the decode path takes (no larger than its biggest graph)."""
        return (self.config.async_decode and k > 1 and self.config.parallel.tensor_parallel_size == 1
                and len(batch.seqs) <= self.runner.max_graph_bs
                and not any(seq.grammar is not None for seq in batch.seqs))   # masks need each token on the host

    def _land(self) -> list[Sequence]:
        """Queue the next run of the in-flight batch when it can go on unchanged, then read and
        apply the in-flight run's tokens (the device works on the next one meanwhile)."""
        launched, wall, t0, resumes = self._inflight
        batch, k = launched.batch, launched.num_steps
        nxt = self.runner.launch_decode(batch, k, resume=True) if self._can_resume(batch, k, resumes) else None
        out = self.runner.collect_decode(launched)
        ready_wall, ready = time.time(), time.perf_counter()       # the device moves on to ``nxt`` now
        self._inflight = (nxt, ready_wall, ready, resumes + 1) if nxt is not None else None
        return self._apply(batch, out, k, wall, t0)

    def _can_resume(self, batch, k: int, resumes: int) -> bool:
        """The batch runs another k steps from where the device is: nothing waits to join, every
        running sequence is in it and none ends by length within the run in flight, and the run
        after it fits their allocated blocks and max_model_len (and the padding rows' positions,
        which advance with every resumed run, stay inside the block tables)."""
        if self.scheduler.waiting or len(self.scheduler.running) != len(batch.seqs):
            return False
        if (resumes + 3) * k > self.max_model_len:
            return False
        bs = self.config.cache.block_size
        for seq in batch.seqs:                    # len(seq): before the in-flight run's k tokens
            if (seq.is_finished or seq.num_output_tokens + k >= seq.params.max_tokens
                    or len(seq) + 2 * k > self.max_model_len or len(seq) + 2 * k - 1 > len(seq.block_table) * bs):
                return False
        return True

    def _apply(self, batch, out, k: int, wall: float, t0: float) -> list[Sequence]:
        """A run's results into the sequences: computed tokens, new tokens, finishes, stats, the
        step log. Sequences that finished meanwhile (aborted, or ended within the previous run while
        this one was in flight) are skipped."""
        s = self.stats
        s.steps += 1
        s.forwards += k
        s.max_batch_size = max(s.max_batch_size, len(batch))
        s.batch_size_hist[len(batch)] = s.batch_size_hist.get(len(batch), 0) + 1
        s.decode_steps += batch.num_decodes == len(batch)
        changed: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.num_new):
            if seq.is_finished:
                continue
            if seq.wants_hidden:         # rows of the positions computed now (a decode run: its first forward's)
                seq.add_hidden(out.hidden[seq.seq_id][:n], seq.num_computed_tokens)
                if seq.num_computed_tokens + n < len(seq):     # a prompt chunk: its rows go out now
                    changed.append(seq)
            seq.num_computed_tokens += n
            if n == 1 and seq.num_output_tokens > 0:
                s.decode_tokens += 1
                s.decode_context_tokens += seq.num_computed_tokens
            else:
                s.prefill_tokens += n
            self.block_manager.register_full_blocks(seq)     # before an encode finishes and frees them
            if out.prompt_logprobs is not None and seq.seq_id in out.prompt_logprobs:
                k = seq.params.prompt_logprobs
                seq.prompt_logprobs += [(lps[0], list(zip(ids[1:1 + k], lps[1:1 + k])))
                                        for ids, lps in out.prompt_logprobs[seq.seq_id]]
            if seq.is_encode:
                seq.hidden_chunks.append(out.hidden[seq.seq_id])
                if seq.num_computed_tokens == len(seq):
                    self._finish(seq, "stop")
                    changed.append(seq)
        for seq, tok, i in zip(out.sampled, out.token_ids, range(len(out.sampled))):
            if seq.is_finished:
                continue
            if seq.params.max_tokens == 0:            # the prompt only (its log-probabilities): no token
                self._finish(seq, "length")
                changed.append(seq)
                continue
            if out.logprobs is not None and seq.params.logprobs is not None:
                self._add_logprobs(seq, out.logprobs[i])
            seq.append_token(tok)
            self._check_finish(seq)
            changed.append(seq)
        if out.multi is not None:
            self._apply_extra_steps(out)
        if self.step_log is not None:
            line = {"t": round(wall, 6), "dt": round(time.perf_counter() - t0, 6), "seqs": len(batch),
                    "decodes": batch.num_decodes, "tokens": batch.num_tokens, "forwards": k, "added": self._added}
            n_gc, gc_s = self.gc_pauses.take()
            if n_gc:
                line["gc"] = round(gc_s, 6)
            self.step_log.write(json.dumps(line) + "\n")
        self._added = 0
        return changed

    def _decode_steps(self, batch) -> int:
        """How many decode steps to run for ``batch`` in one go: only pure decode batches (sampled
        ones are sampled on the device between the forwards); never past a sequence's
        max_model_len or its last allocated block (so that no step needs a block the scheduler
        has not given). A sequence that reaches max_tokens (or a stop) within the run
        drops the tokens after it, as with EOS: sequences a few tokens apart (streams that joined
        at different steps) do not cut every run short near their ends."""
        k = self.config.decode_steps
        if k == 1 or batch.num_decodes != len(batch.seqs):
            return 1
        bs = self.config.cache.block_size
        for seq in batch.seqs:
            if seq.is_encode or needs_eager(seq):      # each step reads its own input row / its tokens so far
                return 1
            k = min(k, self.max_model_len - len(seq), len(seq.block_table) * bs - len(seq) + 1)
        return max(k, 1)

    def _apply_extra_steps(self, out) -> None:
        """Tokens 2..k of a multi-step run, as if each came from its own step; a sequence that
        finishes drops the rest (their K/V sit in its own blocks, which are freed)."""
        s = self.stats
        lps = out.multi_logprobs or [None] * len(out.sampled)
        for seq, toks, lp in zip(out.sampled, out.multi, lps):
            for j, tok in enumerate(toks[1:], start=1):
                if seq.is_finished:
                    break
                if seq.wants_hidden:                     # forward j fed the token forward j - 1 sampled
                    seq.add_hidden(out.hidden[seq.seq_id][j:j + 1], seq.num_computed_tokens)
                seq.num_computed_tokens += 1
                s.decode_tokens += 1
                s.decode_context_tokens += seq.num_computed_tokens
                if lp is not None and seq.params.logprobs is not None:
                    self._add_logprobs(seq, lp[j])
                seq.append_token(tok)
                self._check_finish(seq)
            if not seq.is_finished:
                self.block_manager.register_full_blocks(seq)

    @staticmethod
    def _add_logprobs(seq: Sequence, row: tuple[list[int], list[float]]) -> None:
        """A sampled token's row (``[chosen, top ids...], [their logprobs]``) into the sequence."""
        ids, lps = row
        seq.logprobs.append(lps[0])
        k = seq.params.logprobs
        if k:
            seq.top_logprobs.append(list(zip(ids[1:1 + k], lps[1:1 + k])))

    def _check_finish(self, seq: Sequence) -> None:
        p: SamplingParams = seq.params
        tok = seq.token_ids[-1]
        if seq.grammar is not None:
            reason = seq.grammar.advance(tok)
            if reason == "error":                 # a token outside the grammar: the mask was not applied
                seq.error = EngineError(f"request {seq.request_id}: token {tok} violates its structured output")
            if reason is not None:
                return self._finish(seq, reason)
        if p.stop:                 # stop strings: text per token (streams without them: once per step, CoreLoop)
            before = len(seq.output_text)
            update_text(seq, self.tokenizer, p.skip_special_tokens)
            i = find_stop(seq, p.stop, len(seq.output_text) - before)
            if i != -1:
                seq.output_text = seq.output_text[:i]
                return self._finish(seq, "stop")
        if (not p.ignore_eos and tok in self.eos_ids) or (p.stop_token_ids and tok in p.stop_token_ids):
            return self._finish(seq, "stop")
        if seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            return self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.grammar is not None:
            seq.grammar.free()
        self.scheduler.finish(seq, reason)
        self.seqs.pop(seq.request_id, None)

    # ------------------------------------------------------------------ offline API
    def output_of(self, seq: Sequence) -> dict:
        if seq.is_encode:
            return {"hidden_states": torch.cat(seq.hidden_chunks), "token_ids": seq.token_ids}
        ids = seq.output_token_ids
        if seq.params.stop:
            text = seq.output_text
        else:
            text = self.tokenizer.decode(ids, skip_special_tokens=seq.params.skip_special_tokens)
        out = {"text": text, "token_ids": ids, "finish_reason": seq.finish_reason}
        out.update(logprobs_of(seq))
        if seq.wants_hidden:
            out.update(seq.take_hidden_output())
        return out

    def generate(self, prompts: list | str | dict, sampling_params=None, use_tqdm: bool = True) -> list[dict]:
        """``[{"text", "token_ids", "finish_reason"}]`` in the order of ``prompts``; ``sampling_params``
        one for all, or a list with one per prompt (``ValueError`` when the lengths differ). With
        ``logprobs=k``: ``"logprobs"`` (each token's) and, k > 0, ``"top_logprobs"`` ([{id: logprob}]
        per token, k most likely first); with ``prompt_logprobs=k``: ``"prompt_logprobs"`` (None for
        the first prompt token, then {id: logprob} with the prompt token first, vLLM's shape); with
        ``return_hidden_states``: ``"hidden_states"`` [L + n - 1, H] float32 (every fed position's final
        row: the prompt's, then each output token's but the last), ``"prompt_positions"`` [3, L] and
        ``"rope_delta"`` (M-RoPE prompts; else None)."""
        if isinstance(prompts, (str, dict, MultiModalInputs, InputEmbeds)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        else:
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        seqs = [self.make_sequence(p, sp) for p, sp in zip(prompts, sampling_params)]  # validate all first
        for seq in seqs:
            self.add_sequence(seq)
        bar = tqdm(total=len(seqs), desc="Generating", dynamic_ncols=True, disable=not use_tqdm)
        rates = {"prefill": 0.0, "decode": 0.0}

        def progress(done: list[Sequence], p_tokens: int, d_tokens: int, dt: float) -> None:
            if p_tokens:
                rates["prefill"] = p_tokens / dt
            if d_tokens:
                rates["decode"] = d_tokens / dt
            bar.set_postfix(prefill=f"{rates['prefill']:.0f}tok/s", decode=f"{rates['decode']:.0f}tok/s",
                            refresh=False)
            bar.update(len(done))

        try:
            self._run_until(seqs, progress)
        finally:
            bar.close()
        return [self.output_of(s) for s in seqs]

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, use_tqdm: bool = True,
             **template_kw) -> list[dict]:
        """``generate`` over one conversation or a list of them, each rendered by the checkpoint's chat
        template; messages may carry OpenAI content parts (``image_url``, ``input_audio``) or offline
        ones (``{"type": "image", "image": PIL}``, ``{"type": "audio", "audio": (array, rate)}``)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self.generate([self.render(c, **template_kw) for c in convs], sampling_params, use_tqdm)

    def render(self, messages: list[dict], **template_kw) -> list[int] | MultiModalInputs:
        """One conversation -> token ids (text) or a processed multimodal prompt."""
        if has_media(messages):
            if self.mm_processor is None:
                raise InvalidRequestError(f"{self.model_name} takes text only; image / audio parts are not "
                                          "accepted", param="messages")
            return chat_inputs(self.mm_processor, messages, MediaConfig(), **template_kw)
        try:
            out = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                     **template_kw)
        except Exception as err:  # template errors (e.g. role order) are the caller's fault
            raise InvalidRequestError(f"chat template failed: {err}", param="messages") from None
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def _run_until(self, seqs: list[Sequence], progress=None) -> None:
        """Step until every one of ``seqs`` finished (with whatever else is queued). A step that
        fails one of them aborts the rest of them and raises its ``EngineError``; the engine stays
        usable."""
        try:
            while not all(s.is_finished for s in seqs):
                if self.waits_for_input():              # another thread feeds the rows: sleep until it does
                    self.input_event.wait(0.1)
                    self.input_event.clear()
                t0 = time.perf_counter()
                p0, d0 = self.stats.prefill_tokens, self.stats.decode_tokens
                changed = self.step_seqs()
                failed = next((s for s in changed if s.error is not None and s in seqs), None)
                if failed is not None:
                    raise failed.error
                if progress is not None:
                    progress([s for s in changed if s.is_finished], self.stats.prefill_tokens - p0,
                             self.stats.decode_tokens - d0, time.perf_counter() - t0)
        except BaseException:
            for s in seqs:                     # the caller gives up on them (error, KeyboardInterrupt)
                if not s.is_finished:
                    self.abort(s.request_id)
            raise

    def encode(self, prompts: list | str, layer: int | None = None, drop_tokens: int = 0,
               encoding=None) -> list[torch.Tensor]:
        """Prompt hidden states [T, H] for each prompt (batched with whatever else is queued); with
        ``drop_tokens=k`` the rows of positions k.. ([T - k, H]). ``encoding`` (a ``TextEncoding``,
        ``omni_ray.ar.text_encoding``: a diffusers pipeline's text-encoder recipe) formats each prompt
        (text, or ``{"prompt": text, "multi_modal_data": {"image": PIL}}``) as that pipeline does and
        returns what it conditions on: [T - drop_tokens, H] float32 of its layer."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if encoding is not None:
            params = EncodeParams(encoding.layer, drop_tokens=encoding.drop_tokens)
            prompts = [self.encoding_inputs(encoding, p) for p in prompts]
        else:
            params = EncodeParams(layer, drop_tokens=drop_tokens)
        seqs = [self.make_sequence(p, params) for p in prompts]
        for seq in seqs:
            self.add_sequence(seq)
        self._run_until(seqs)
        return [torch.cat(s.hidden_chunks) for s in seqs]

    def encoding_inputs(self, encoding, prompt):
        """A text-encoder recipe's engine prompt for ``prompt``: text, or vLLM's dict with the image in
        ``multi_modal_data`` (``{"prompt": text, "multi_modal_data": {"image": PIL}}``)."""
        image = None
        if isinstance(prompt, dict):
            data = prompt.get("multi_modal_data") or {}
            if set(prompt) - {"prompt", "multi_modal_data"} or set(data) - {"image"}:
                raise InvalidRequestError("a prompt dict for a text encoder has 'prompt' and optionally "
                                          "'multi_modal_data': {'image': ...}", param="prompt")
            prompt, image = prompt.get("prompt"), data.get("image")
        return encoding.inputs(self.tokenizer, self.mm_processor, prompt, image)

    def engine_stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_blocks": bm.num_blocks, "num_free_blocks": bm.num_free_blocks,
            "num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
            "steps": self.stats.steps, "max_batch_size": self.stats.max_batch_size,
            "prefill_tokens": self.stats.prefill_tokens, "decode_tokens": self.stats.decode_tokens,
            "prefix_cache_hit_tokens": bm.prefix_hits, "prefix_cache_query_tokens": bm.prefix_queries,
            "prefix_cache_hit_rate": bm.prefix_hits / bm.prefix_queries if bm.prefix_queries else 0.0,
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_cache_usage": 1.0 - bm.num_free_blocks / bm.num_blocks,
            "grammar_matchers": self.grammar.num_active, "grammar_compiling": len(self.compiling),
        } | self._media_stats()

    def _media_stats(self) -> dict:
        """Multimodal engines: media items run through this engine's towers / taken with their embedding."""
        enc = getattr(self.runner, "encoders", None)
        return {} if enc is None else {"media_encoded_items": enc.encoded_items, "media_received_items":
                                       enc.received_items}


def logprobs_of(seq: Sequence) -> dict:
    """The log-probabilities a finished sequence's caller asked for (``LLMEngine.generate``'s keys)."""
    p, out = seq.params, {}
    if p.logprobs is not None:
        out["logprobs"] = list(seq.logprobs)
        if p.logprobs:
            out["top_logprobs"] = [dict(top) for top in seq.top_logprobs]
    if p.prompt_logprobs is not None:
        out["prompt_logprobs"] = [None] + [{tok: lp} | dict(top) for tok, (lp, top)
                                           in zip(seq.token_ids[1:seq.num_prompt_tokens], seq.prompt_logprobs[1:])]
    return out


LLM = LLMEngine
