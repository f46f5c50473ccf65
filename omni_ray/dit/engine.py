"""The offline DiT engine: requests in, step-level continuous batching, images out.

    engine = DiTEngine("tiny:pixart")
    images = engine.generate(["a red fox"], DiffusionParams(num_inference_steps=20, seed=0))

Every ``step()`` admits waiting requests (text encoding, initial noise, their own scheduler),
runs one transformer forward for the next group of compatible requests, steps each one's
scheduler, and VAE-decodes (in batches) the requests that just finished.

Videos (families with ``produces_video``) leave the denoising batch when their last step is done
and are VAE-decoded a few latent frames per engine step (``vae_decode_chunk``) while other
requests denoise, all at once when nothing else waits (``omni_ray/dit/video_decode.py``): one
finished video never stalls the others' denoising for the whole decode.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict

import torch
from tqdm.auto import tqdm

from omni_ray.config import DiTEngineConfig, ModelConfig, validate
from omni_ray.devices import resolve_device, resolve_dtype
from omni_ray.dit.batcher import Batcher
from omni_ray.dit.families import Cond, DiTFamily, load_family
from omni_ray.dit.images import decode_outputs
from omni_ray.dit.parallel import Layout, ParallelRunner, build_parallel_runner, make_layout
from omni_ray.dit.parallel.rank import prepare_family
from omni_ray.dit.params import DiffusionParams
from omni_ray.dit.request import DiTRequest, Status
from omni_ray.dit.runner import DiTRunner
from omni_ray.dit.speech import SpeechInput, audio_outputs, build_speech_request
from omni_ray.dit.validation import build_request
from omni_ray.dit.video_decode import VideoDecode, video_outputs
from omni_ray.errors import ConfigError, InvalidRequestError
from omni_ray.testing import resolve_model


def _bad(param: str, msg: str):
    raise InvalidRequestError(msg, param=param)


class DiTEngine:
    def __init__(self, model: str | ModelConfig | DiTEngineConfig, family: DiTFamily | None = None, **kwargs):
        """``family``: an already built family (``from_components``); then nothing is loaded from disk."""
        if isinstance(model, DiTEngineConfig):
            cfg = model
        else:
            m = model.model_dump() if isinstance(model, ModelConfig) else {"path": str(model)}
            if "dtype" in kwargs:
                m["dtype"] = kwargs.pop("dtype")
            cfg = validate(DiTEngineConfig, {"model": m, **kwargs})
        self.config = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        layout = make_layout(cfg)
        self.parallel: ParallelRunner | None = None   # cfg / sequence parallel: ranks as Ray actors
        if family is not None:
            if layout is not None:
                raise ConfigError("an engine over in-memory components runs on one device (no parallel layout)")
            self.model_path = None
            self.family, self.device, self.dtype = family, family.device, family.dtype
            self.runner = DiTRunner(family, prepare_family(family, cfg, Layout(1, 1)))
        elif layout is not None:                      # each rank (rank 0: here) loads the model on its device
            self.model_path = resolve_model(cfg.model.path)
            self.runner = self.parallel = build_parallel_runner(cfg, self.model_path, self.dtype, layout)
            self.family, self.device = self.runner.family, self.runner.family.device
        else:
            self.model_path = resolve_model(cfg.model.path)
            self.family = load_family(self.model_path, self.device, self.dtype, cfg.max_sequence_length,
                                      cfg.model.allow_pickle)
            self.runner = DiTRunner(self.family, prepare_family(self.family, cfg, Layout(1, 1)))
        self.batcher = Batcher(cfg.max_batch_size)
        self.requests: dict[str, DiTRequest] = {}
        # step() may run in a worker thread while add()/abort() come from another: the lock guards
        # the bookkeeping (never held during GPU work); requests in _in_flight are being computed on
        # outside it, so an abort leaves their tensors to the step that holds them
        self._lock = threading.RLock()
        self._gpu = threading.Lock()             # one thread at a time on the models (step / encode_prompt)
        self._in_flight: set[DiTRequest] = set()
        self._arrivals = itertools.count()
        self._neg_conds: OrderedDict[str, Cond] = OrderedDict()   # negative prompt -> projected conditioning
        self.counts = {"added": 0, "finished": 0, "aborted": 0, "images": 0, "vae_batches": 0,
                       "video_decode_chunks": 0}
        self._decoding: list[tuple[DiTRequest, VideoDecode]] = []   # finished videos being VAE-decoded

    @classmethod
    def from_components(cls, pipeline_class: str, components: dict, config: DiTEngineConfig) -> "DiTEngine":
        """An engine over components already in memory (``{"transformer", "vae", "scheduler", ...}`` as
        ``load_components`` returns them), e.g. a benchmark's random weights built on the GPU: no
        checkpoint is written or read. ``pipeline_class`` picks the family (model_index.json's name)."""
        from omni_ray.dit.families import FAMILIES, family_class

        if pipeline_class not in FAMILIES:
            raise ConfigError(f"pipeline {pipeline_class!r} is not supported; omni-ray runs {sorted(FAMILIES)}")
        tr = components["transformer"]
        p = next(tr.parameters())
        family = family_class(pipeline_class, components)(components, p.device, p.dtype, config.max_sequence_length)
        return cls(config, family=family)

    @property
    def model_name(self) -> str:
        return self.config.model.served_name

    # ------------------------------------------------------------------ requests
    def make_request(self, prompt: str | None, params: DiffusionParams | None = None, request_id: str | None = None,
                     prompt_embeds: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                     output_type: str = "pil", negative_prompt_embeds: torch.Tensor | None = None,
                     negative_prompt_mask: torch.Tensor | None = None, image=None,
                     speech: SpeechInput | None = None) -> DiTRequest:
        """Validate and build a request (raises InvalidRequestError; touches no engine state or GPU).

        ``negative_prompt_embeds`` / ``negative_prompt_mask``: the negative prompt's conditioning (e.g. the
        AR stage's hidden states of it), used instead of encoding ``params.negative_prompt``; ``image``:
        the input image (PIL) of an edit model; ``speech``: the codec tokens and voice of a speech model
        (omni_ray/dit/speech.py), which takes nothing else."""
        if request_id is not None and request_id in self.requests:
            _bad("request_id", f"request id {request_id!r} is already in use")
        if speech is not None or self.family.produces_audio:
            return self._speech_request(prompt, params, request_id, output_type, speech,
                                        prompt_embeds=prompt_embeds, prompt_mask=prompt_mask, image=image,
                                        negative_prompt_embeds=negative_prompt_embeds,
                                        negative_prompt_mask=negative_prompt_mask)
        req = build_request(self.family, self.config, prompt, params, request_id, prompt_embeds, prompt_mask,
                            output_type, negative_prompt_embeds, negative_prompt_mask, image)
        fam = self.family
        if req.negative_prompt_embeds is not None and not fam.supports_caption_mask:
            tokens = req.prompt_embeds.shape[0] if req.prompt_embeds is not None else fam.max_embed_tokens
            if req.negative_prompt_embeds.shape[0] != tokens:     # both CFG halves share one unmasked forward
                _bad("negative_prompt_embeds", f"negative_prompt_embeds must have {tokens} tokens, as the prompt's: "
                     "this model attends to every caption token")
        if self.parallel is not None:
            self.parallel.check_request(req)      # no step caching; EngineError once a rank died
        return req

    def _speech_request(self, prompt, params, request_id, output_type, speech, **others) -> DiTRequest:
        if not self.family.produces_audio:
            _bad("speech", f"model {self.model_name!r} does not synthesize speech")
        if speech is None:
            _bad("speech", f"model {self.model_name!r} synthesizes speech: pass speech=SpeechInput(codes, voice)")
        for name, v in others.items():
            if v is not None:
                _bad(name, f"{name} does not apply to speech synthesis")
        if self.parallel is not None:
            _bad("speech", "speech synthesis runs on one device (no parallel layout)")
        return build_speech_request(self.family, self.config, prompt, params, request_id, speech, output_type)

    def add_request(self, prompt: str | None, params: DiffusionParams | None = None, request_id: str | None = None,
                    prompt_embeds: torch.Tensor | None = None, prompt_mask: torch.Tensor | None = None,
                    output_type: str = "pil", negative_prompt_embeds: torch.Tensor | None = None,
                    negative_prompt_mask: torch.Tensor | None = None, image=None,
                    speech: SpeechInput | None = None) -> DiTRequest:
        req = self.make_request(prompt, params, request_id, prompt_embeds, prompt_mask, output_type,
                                negative_prompt_embeds, negative_prompt_mask, image, speech)
        self.add(req)
        return req

    def add(self, req: DiTRequest) -> None:
        with self._lock:
            if req.request_id in self.requests:
                _bad("request_id", f"request id {req.request_id!r} is already in use")
            req.arrival = next(self._arrivals)
            self.requests[req.request_id] = req
            self.batcher.add(req)
            self.counts["added"] += 1

    def abort(self, request_id: str) -> bool:
        """Drop a request at once (thread-safe; its slot is free for the next step)."""
        with self._lock:
            req = self.requests.pop(request_id, None)
            if req is None:
                return False
            self.batcher.remove(req)
            self._decoding = [(q, d) for q, d in self._decoding if q is not req]
            req.status = Status.ABORTED
            if req not in self._in_flight:
                self._release(req)
            self.counts["aborted"] += 1
            return True

    @staticmethod
    def _release(req: DiTRequest) -> None:
        req.latents = req.cond = req.neg_cond = req.cache_state = req.scheduler = req.cond_latents = None
        req.image = req.speech = None

    def check_health(self) -> None:
        """Raise EngineError if a parallel worker rank died (a single-process engine is always fine)."""
        if self.parallel is not None:
            self.parallel.check_health()

    def shutdown(self) -> None:
        """Stop the parallel worker ranks, if any (idempotent)."""
        if self.parallel is not None:
            self.parallel.shutdown()

    def has_work(self) -> bool:
        with self._lock:
            return self.batcher.has_work() or bool(self._decoding)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def encode_prompt(self, prompts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text -> (embeds [B, T, H] float32 CPU, mask [B, T] long CPU), ready to pass back as
        ``prompt_embeds=embeds[i]`` / ``prompt_mask=mask[i]`` (skips the text encoder)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not self.family.has_text_encoder:
            _bad("prompt", f"model {self.model_name!r} has no text encoder")
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            _bad("prompt", "prompts must be non-empty strings")
        with self._gpu:                           # safe to call from any thread, between steps
            embeds, mask = self.family.encode_prompt(prompts)
        return embeds.float().cpu(), mask.long().cpu()

    def _cond(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> Cond:
        if mask is None:
            mask = torch.ones(embeds.shape[0], dtype=torch.long)
        if self.family.supports_caption_mask:     # drop right padding: it is masked anyway
            nz = mask.nonzero()
            # an empty caption (all padding: "" from a tokenizer that adds no EOS) keeps one masked
            # token, whose attention is uniform over the masked ones, as diffusers' padded captions get
            keep = int(nz.max()) + 1 if nz.numel() else 1
            embeds, mask = embeds[:keep], mask[:keep]
        return self.family.project(embeds, mask)

    def _given(self, embeds: torch.Tensor, mask: torch.Tensor | None) -> Cond:
        """The conditioning of a request's own embeds (prompt_embeds / negative_prompt_embeds)."""
        return self._cond(embeds.to(self.device, self.dtype), None if mask is None else mask.to(self.device))

    def _negative(self, text: str, encoded: dict) -> Cond:
        if text in self._neg_conds:
            self._neg_conds.move_to_end(text)
            return self._neg_conds[text]
        if self.family.has_text_encoder:
            embeds, mask = encoded[text] if text in encoded else self.family.encode_prompt([text])
            cond = self._cond(embeds.squeeze(0) if embeds.dim() == 3 else embeds,
                              mask.squeeze(0) if mask.dim() == 2 else mask)
        else:
            cond = self._cond(*self.family.null_embeds())
        self._neg_conds[text] = cond
        if len(self._neg_conds) > 64:
            self._neg_conds.popitem(last=False)
        return cond

    # ------------------------------------------------------------------ admission
    @torch.no_grad()
    def _admit(self, reqs: list[DiTRequest]) -> None:
        fam = self.family
        texts = {r.prompt for r in reqs if r.prompt_embeds is None and r.speech is None}
        if fam.has_text_encoder:
            texts |= {r.negative_prompt for r in reqs
                      if r.do_cfg and r.negative_prompt_embeds is None and r.negative_prompt not in self._neg_conds}
        encoded: dict = {}
        if texts:
            order = sorted(texts)
            embeds, mask = fam.encode_prompt(order)
            encoded = {t: (embeds[i], mask[i]) for i, t in enumerate(order)}
        for r in reqs:
            if r.speech is None:                  # speech: the family conditions it in prepare_request
                self._condition(r, encoded)
            r.generator = torch.Generator(device=self.device).manual_seed(r.seed)
            r.scheduler = fam.new_scheduler(r.num_steps, r.height, r.width)
            r.timesteps = r.scheduler.timesteps
            fam.prepare_request(r)                # initial latents; an input image's cond_latents
            r.shapes = fam.latent_shapes(r)
            r.key = fam.batch_key(r)
            with self._lock:
                if r.status is Status.ABORTED:
                    self._release(r)
                else:
                    self.batcher.start(r)

    def _condition(self, r: DiTRequest, encoded: dict) -> None:
        """A prompt's conditioning (its embeds, or the text encoder's) and its negative's."""
        if r.prompt_embeds is not None:
            r.cond = self._given(r.prompt_embeds, r.prompt_mask)
        else:
            r.cond = self._cond(*encoded[r.prompt])
        if not r.do_cfg:
            r.neg_cond = None
        elif r.negative_prompt_embeds is not None:
            r.neg_cond = self._given(r.negative_prompt_embeds, r.negative_prompt_mask)
        else:
            r.neg_cond = self._negative(r.negative_prompt, encoded)

    # ------------------------------------------------------------------ one engine step
    def step(self) -> list[tuple[DiTRequest, str]]:
        """Admit, run one batched denoising step, decode the finished. Returns ``(request, kind)``
        events: ``"progress"`` for each request stepped, ``"done"`` for each one finished."""
        with self._gpu:
            return self._step()

    def _step(self) -> list[tuple[DiTRequest, str]]:
        with self._lock:
            new = self.batcher.admit()
            self._in_flight.update(new)
        try:
            if new:
                self._admit(new)
        finally:
            with self._lock:
                self._in_flight.difference_update(new)
        with self._lock:
            batch = self.batcher.schedule()
            self._in_flight.update(batch)
        events: list[tuple[DiTRequest, str]] = []
        if batch:
            events = self._denoise(batch)
        if self._decoding:
            with self._lock:
                busy = self.batcher.has_work()
            events += self._decode_videos(busy)
        return events

    def _denoise(self, batch: list[DiTRequest]) -> list[tuple[DiTRequest, str]]:
        try:
            before = {r: r.step_idx for r in batch}
            self.runner.step(batch)
            with self._lock:
                live = [r for r in batch if r.status is Status.RUNNING]
                done = [r for r in live if r.is_done]
                for r in done:
                    self.batcher.remove(r)
            # one per evaluation: a speech batch's whole ODE (omni_ray/dit/token2wav_ode.py) makes many in a step
            events = [(r, "progress") for r in live for _ in range(r.step_idx - before[r])]
            videos = [r for r in done if self.family.produces_video and r.output_type != "latent"]
            done = [r for r in done if r not in videos]
            for r in videos:                     # decoded chunk by chunk, from this step on
                self._decoding.append((r, VideoDecode(self.family.vae, self.family.denormalize(r.latents))))
            if done:
                cfg = self.config
                self.counts["vae_batches"] += (audio_outputs(self.family, done, cfg.vae_batch_size)
                                               if self.family.produces_audio else
                                               decode_outputs(self.family, done, cfg.vae_batch_size,
                                                              cfg.vae_batch_pixels))
                with self._lock:
                    done = [r for r in done if r.status is Status.RUNNING]     # not aborted meanwhile
                    for r in done:
                        self._complete(r)
                events += [(r, "done") for r in done]
        finally:
            with self._lock:
                self._in_flight.difference_update(batch)
                for r in batch:
                    if r.status is Status.ABORTED:
                        self._release(r)
        return events

    def _decode_videos(self, busy: bool) -> list[tuple[DiTRequest, str]]:
        """Advance the finished videos' VAE decodes: the oldest by ``vae_decode_chunk`` latent frames
        while other requests denoise (``busy``), else every one to its end."""
        with self._lock:
            self._decoding = [(r, d) for r, d in self._decoding if r.status is Status.RUNNING]   # drop aborted
            jobs = self._decoding[:1] if busy else list(self._decoding)
        events = []
        for r, job in jobs:
            while not job.finished:
                job.step(self.config.vae_decode_chunk)
                self.counts["video_decode_chunks"] += 1
                if busy:
                    break
            if not job.finished:
                continue
            video = job.result()
            with self._lock:
                self._decoding = [(q, d) for q, d in self._decoding if q is not r]
                if r.status is Status.RUNNING:
                    r.images = video_outputs(video, r.output_type)
                    self._complete(r)
                    events.append((r, "done"))
        return events

    def _complete(self, r: DiTRequest) -> None:
        r.status = Status.FINISHED
        self._release(r)
        self.requests.pop(r.request_id, None)
        self.counts["finished"] += 1
        self.counts["images"] += r.num_images

    # ------------------------------------------------------------------ offline API
    def generate(self, prompts: str | list[str] | None = None,
                 params: DiffusionParams | list[DiffusionParams] | None = None,
                 prompt_embeds: torch.Tensor | list[torch.Tensor] | None = None,
                 prompt_mask: torch.Tensor | list[torch.Tensor] | None = None,
                 use_tqdm: bool = True, output_type: str = "pil",
                 negative_prompt_embeds: torch.Tensor | list[torch.Tensor] | None = None,
                 negative_prompt_mask: torch.Tensor | list[torch.Tensor] | None = None,
                 image=None, speech: SpeechInput | list[SpeechInput] | None = None) -> list:
        """Images for each prompt (``num_images_per_prompt`` each, in prompt order): PIL images,
        or float [H, W, 3] arrays in [0, 1] (``output_type="np"``), or latents (``"latent"``).
        ``image``: an edit model's input image (one PIL image for all prompts, or a list).
        Video models give one array per video: uint8 [F, H, W, 3] (``"pil"``) or float32 [F, H, W, 3]
        in [0, 1] (``"np"``); an image-to-video model's ``image`` is the first frame.
        Speech models (``speech=``, one SpeechInput or a list, no prompts): one float32 waveform per
        SpeechInput (numpy, at ``family.sample_rate``), or its mel [T_mel, mel_dim] (``"latent"``)."""
        if speech is not None:
            speech = list(speech) if isinstance(speech, (list, tuple)) else [speech]
            n = len(speech)
        else:
            n = self._num_prompts(prompts, prompt_embeds)
            speech = [None] * n
        prompts = [prompts] * n if prompts is None or isinstance(prompts, str) else list(prompts)
        plist = params if isinstance(params, list) else [params] * n
        embeds = self._per_prompt(prompt_embeds, n, 3)
        masks = self._per_prompt(prompt_mask, n, 2)
        neg_embeds = self._per_prompt(negative_prompt_embeds, n, 3)
        neg_masks = self._per_prompt(negative_prompt_mask, n, 2)
        images = list(image) if isinstance(image, (list, tuple)) else [image] * n
        if len(prompts) != n or len(plist) != n or len(images) != n:
            _bad("params", "prompts, params, prompt_embeds and images must have the same length")
        reqs = [self.make_request(p, sp, None, e, m, output_type, ne, nm, im, s)     # validate all first
                for p, sp, e, m, ne, nm, im, s in zip(prompts, plist, embeds, masks, neg_embeds, neg_masks, images,
                                                      speech)]
        for r in reqs:
            self.add(r)
        bar = tqdm(total=sum(r.num_steps for r in reqs), desc="Denoising", unit="step", dynamic_ncols=True,
                   disable=not use_tqdm)
        try:
            while not all(r.is_finished for r in reqs):
                events = self.step()
                bar.update(sum(1 for r, kind in events if kind == "progress" and r in reqs))
        except BaseException:
            for r in reqs:
                self.abort(r.request_id)
            raise
        finally:
            bar.close()
        return [img for r in reqs for img in r.images]

    @staticmethod
    def _num_prompts(prompts, embeds) -> int:
        if isinstance(prompts, list):
            return len(prompts)
        if prompts is not None:
            return 1
        if embeds is None:
            _bad("prompt", "give prompts or prompt_embeds")
        if isinstance(embeds, torch.Tensor):
            return 1 if embeds.dim() == 2 else embeds.shape[0]
        return len(embeds)

    @staticmethod
    def _per_prompt(x, n: int, batched_dim: int) -> list:
        if x is None:
            return [None] * n
        if isinstance(x, torch.Tensor):
            x = [x] if x.dim() == batched_dim - 1 else list(x)
        if len(x) != n:
            _bad("prompt_embeds", f"got {len(x)} prompt_embeds/prompt_mask entries for {n} prompts")
        return list(x)

    # ------------------------------------------------------------------ stats
    def engine_stats(self) -> dict:
        with self._lock:
            return self._stats()

    def _stats(self) -> dict:
        s = self.runner.stats
        return {
            "active_requests": len(self.batcher.running),
            "decoding_videos": len(self._decoding),
            "video_decode_chunks": self.counts["video_decode_chunks"],
            "active_images": self.batcher.running_images,
            "waiting_requests": len(self.batcher.waiting),
            "steps": s.forwards,
            "last_batch_size": s.last_batch_images,
            "last_batch_requests": s.last_batch_requests,
            "last_batch_rows": s.last_batch_rows,
            "avg_batch_size": s.images / s.forwards if s.forwards else 0.0,
            "max_batch_size": s.max_batch_images,
            "block_evals": s.block_evals,
            "block_evals_without_cache": s.block_evals_full,
            "cache_skips": s.cache_skips,
            "requests_added": self.counts["added"],
            "requests_finished": self.counts["finished"],
            "requests_aborted": self.counts["aborted"],
            "images_generated": self.counts["images"],
            "vae_batches": self.counts["vae_batches"],
            "cuda_graphs": len(self.runner.graphs.graphs) if self.runner.graphs else 0,
            "cuda_graph_replays": self.runner.graphs.replays if self.runner.graphs else 0,
            "ode_graphs": len(ode.graphs) if (ode := getattr(self.runner.graphs, "ode", None)) else 0,
            "ode_graph_replays": ode.replays if ode else 0,
            "vocoder_graphs": len(voc.graphs) if (voc := getattr(self.family, "vocoder_graphs", None)) else 0,
            "vocoder_graph_replays": voc.replays if voc else 0,
            "parallel_ranks": self.parallel.layout.world if self.parallel is not None else 1,
            **({"parallel": self.parallel.describe()} if self.parallel is not None else {}),
        }
