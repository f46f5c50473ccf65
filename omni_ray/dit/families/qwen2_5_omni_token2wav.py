"""Qwen2.5-Omni token2wav on the DiT engine: codec tokens -> mel (flow-matching DiT, RK4) -> waveform (BigVGAN).

The modules are transformers' own (``Qwen2_5OmniToken2WavModel``: ``code2wav_dit_model`` and
``code2wav_bigvgan_model``), loaded from the ``token2wav.*`` tensors of a
``Qwen2_5OmniForConditionalGeneration`` checkpoint directory (config.json ``architectures``; no
model_index.json) and run in float32, as the reference requires. The voices are the checkpoint's
``spk_dict.pt`` (per voice a speaker vector ``cond`` and a reference mel ``ref_mel``), read with
``torch.load(weights_only=True)``: plain tensors, part of the checkpoint, never user input.

How the engine drives it (``Qwen2_5OmniToken2WavDiTModel.sample`` split into engine steps):

* latents: the mel ``[1, T_mel, 80]`` (``T_mel = len(codes) * repeats``), noise drawn from the
  request's seed as the reference draws it (``randn([1, T_mel, 80])``);
* scheduler: ``RK4FlowScheduler`` (omni_ray/dit/rk4.py), one transformer forward per RK4 evaluation;
* conditioning: per request, once: ``Cond.tokens`` = ``[T_mel, enc_dim + emb_dim + enc_emb_dim]``, the
  columns the DiT's input projection reads after the noisy mel (the speaker encoder's output of the
  voice's reference mel, the codec embeddings, the speaker vector); the CFG half has them of a zero
  reference mel, code 0 and a zero vector, as ``DiTInputEmbedding`` builds its doubled batch;
* CFG: the guided prediction ``cond + (cond - uncond) * guidance_scale``, off below 1e-5;
* batching: requests of any code lengths share a forward. Rows are right-padded to the longest; the
  attention keeps the reference's block mask (look-back / look-ahead blocks per layer) and drops the
  padded keys for real queries (every other op is per frame), so a padded row computes what it
  computes alone (up to the rounding of a longer reduction);
* decode: the BigVGAN vocoder, per equal-length group (omni_ray/dit/speech.py ``audio_outputs``), as CUDA graphs
  per (row bucket, mel length) where the engine runs them (omni_ray/dit/vocoder_graphs.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from omni_ray.devices import to_device
from omni_ray.dit.families.base import BlockState, Cond, DiTFamily
from omni_ray.dit.rk4 import RK4FlowScheduler
from omni_ray.errors import ConfigError, InvalidRequestError

_FAR = 1 << 20          # a block distance no layer attends over: marks padded keys


def _bad(param: str, msg: str):
    raise InvalidRequestError(msg, param=param)


def read_weights(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The safetensors tensors under ``prefix`` (stripped), from one file or a sharded index."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted({f for k, f in json.loads(index.read_text())["weight_map"].items() if k.startswith(prefix)})
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(path / name), "pt") as sf:
            for k in sf.keys():
                if k.startswith(prefix):
                    out[k[len(prefix):]] = sf.get_tensor(k)
    if not out:
        raise ConfigError(f"{path}: no {prefix}* tensors (a Qwen2.5-Omni checkpoint without its token2wav model?)")
    return out


def load_token2wav(path: Path, device: torch.device):
    """(transformers' ``Qwen2_5OmniToken2WavModel`` in float32 on ``device``, its voices)."""
    from transformers import Qwen2_5OmniConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavModel

    cfg = Qwen2_5OmniConfig.from_pretrained(str(path), local_files_only=True)
    model = Qwen2_5OmniToken2WavModel._from_config(cfg.token2wav_config, attn_implementation="sdpa",
                                                   dtype=torch.float32)
    missing, unexpected = model.load_state_dict(read_weights(path, "token2wav."), strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: token2wav weights do not match the config (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    spk = path / "spk_dict.pt"
    if not spk.exists():
        raise ConfigError(f"{path} has no spk_dict.pt (the voices of Qwen2.5-Omni's token2wav)")
    voices = torch.load(spk, map_location="cpu", weights_only=True)
    return model.to(device).eval().requires_grad_(False), voices


class Qwen2_5OmniToken2WavFamily(DiTFamily):
    pipeline_class = "Qwen2_5OmniForConditionalGeneration"      # config.json's architectures
    default_steps = 10                   # the reference's num_steps (time points; 9 RK4 intervals)
    default_guidance = 0.5
    supports_caption_mask = True
    produces_audio = True
    sample_rate = 24000                  # Qwen2.5-Omni's output rate (100 mel frames/s x the vocoder's hop of 240)
    default_voice = "Chelsie"            # the reference's default speaker

    def __init__(self, comps: dict, device: torch.device, dtype: torch.dtype, max_sequence_length: int | None):
        model, voices = comps["token2wav"], comps["voices"]
        self.device, self.dtype = device, torch.float32
        self.model = model
        self.transformer = model.code2wav_dit_model
        self.vae = model.code2wav_bigvgan_model
        self.base_scheduler = None
        c = self.transformer.config
        self.mel_dim, self.repeats, self.block_size = c.mel_dim, c.repeats, c.block_size
        self.num_codes = c.num_embeds + 1                   # the codec embedding's rows
        self.heads = c.num_attention_heads
        self.max_sequence_length = c.max_position_embeddings
        self.vae_scale_factor, self.patch_size, self.in_channels = 1, 1, self.mel_dim
        self.block_fns = list(self.transformer.transformer_blocks)
        self._voices: dict[str, dict] = {}
        for name, v in voices.items():
            if not isinstance(v, dict) or not {"cond", "ref_mel"} <= set(v):
                raise ConfigError(f"spk_dict.pt: voice {name!r} has no cond / ref_mel")
            self._voices[name] = {"cond": v["cond"].float().reshape(1, -1).to(device),
                                  "ref_mel": v["ref_mel"].float().reshape(1, -1, self.mel_dim).to(device)}
        self._speaker: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}    # voice -> speaker encoder outputs
        self.vocoder_graphs = None           # VocoderGraphs (omni_ray/dit/vocoder_graphs.py): set by the engine

    @classmethod
    def load(cls, path: Path, device: torch.device, dtype: torch.dtype, max_sequence_length: int | None = None):
        model, voices = load_token2wav(path, device)
        return cls({"token2wav": model, "voices": voices}, device, dtype, max_sequence_length)

    # ------------------------------------------------------------------ requests
    @property
    def voices(self) -> list[str]:
        return sorted(self._voices)

    def resolve_voice(self, voice: str | None) -> str:
        """The checkpoint's name of ``voice`` (exact, else the one case-insensitive match)."""
        if voice is None:
            return self.default_voice if self.default_voice in self._voices else self.voices[0]
        if not isinstance(voice, str):
            _bad("voice", f"voice must be a string, got {type(voice).__name__}")
        if voice in self._voices:
            return voice
        match = [v for v in self._voices if v.lower() == voice.lower()]
        if len(match) == 1:
            return match[0]
        _bad("voice", f"unknown voice {voice!r}; this model has {self.voices}")

    def check_codes(self, codes) -> torch.Tensor:
        """Codec tokens -> a 1-D LongTensor on the CPU (InvalidRequestError(param="codes"))."""
        if isinstance(codes, (list, tuple)):
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
                _bad("codes", "codes must be integers")
            codes = torch.tensor(codes, dtype=torch.long)
        elif isinstance(codes, np.ndarray) and codes.dtype.kind in "iu":
            codes = torch.from_numpy(codes.astype(np.int64))
        if (not isinstance(codes, torch.Tensor) or codes.is_floating_point() or codes.is_complex()
                or codes.dtype == torch.bool):
            _bad("codes", "codes must be a list of ints or an integer torch.Tensor / numpy array [N]")
        if codes.dim() == 2 and codes.shape[0] == 1:
            codes = codes[0]
        if codes.dim() != 1 or codes.numel() == 0:
            _bad("codes", f"codes must be a non-empty 1-D sequence, got shape {list(codes.shape)}")
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= self.num_codes:
            _bad("codes", f"codes must lie in [0, {self.num_codes - 1}], got values in [{lo}, {hi}]")
        frames = codes.numel() * self.repeats
        if frames > self.max_sequence_length:
            _bad("codes", f"{codes.numel()} codes make {frames} mel frames; the model's limit is "
                 f"{self.max_sequence_length} ({self.max_sequence_length // self.repeats} codes)")
        return codes.detach().long().cpu()

    def cfg_enabled(self, guidance_scale: float, has_negative: bool) -> bool:
        return not guidance_scale < 1e-5                 # the reference: CFG unless guidance_scale < 1e-5

    def combine_cfg(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        return cond + (cond - uncond) * scale

    def new_scheduler(self, steps: int, height: int, width: int) -> RK4FlowScheduler:
        return RK4FlowScheduler(steps)          # prepare_request sets the request's own (its sway)

    def batch_key(self, r) -> tuple:
        """Any two speech requests can share a forward (rows are padded, see the module docstring)."""
        return ("speech",)

    @torch.no_grad()
    def _speaker_states(self, voice: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The speaker encoder's outputs [enc_dim] for the voice's reference mel and for the CFG half's
        zero mel, once per voice (the reference recomputes them every forward: same values)."""
        if voice not in self._speaker:
            ref = self._voices[voice]["ref_mel"]
            enc = self.transformer.input_embed.spk_encoder(torch.cat([ref, torch.zeros_like(ref)]))
            self._speaker[voice] = (enc[0], enc[1])
        return self._speaker[voice]

    @torch.no_grad()
    def prepare_request(self, r) -> None:
        """Admission: conditioning of both CFG halves, the RK4 scheduler, the initial noise."""
        sp = r.speech
        codes = to_device(sp.codes, self.device)[None]                   # [1, N]
        frames = codes.shape[1] * self.repeats
        enc, enc_null = self._speaker_states(sp.voice)
        spk = self._voices[sp.voice]["cond"][0]
        text = self.transformer.text_embed
        r.cond = Cond(self._columns(enc, text(codes)[0], spk, frames))
        r.neg_cond = (Cond(self._columns(enc_null, text(torch.zeros_like(codes))[0], torch.zeros_like(spk), frames))
                      if r.do_cfg else None)
        r.scheduler = RK4FlowScheduler(r.num_steps, sp.sway_coefficient)
        r.timesteps = r.scheduler.timesteps
        if sp.noise is not None:
            r.latents = to_device(sp.noise, self.device, torch.float32).reshape(1, frames, self.mel_dim).clone()
        else:
            r.latents = torch.randn([1, frames, self.mel_dim], generator=r.generator, device=self.device,
                                    dtype=torch.float32)

    @staticmethod
    def _columns(enc: torch.Tensor, code_embed: torch.Tensor, spk: torch.Tensor, frames: int) -> torch.Tensor:
        """[T_mel, enc_dim + emb_dim + enc_emb_dim], in the order DiTInputEmbedding concatenates them."""
        return torch.cat([enc.expand(frames, -1), code_embed, spk.expand(frames, -1)], dim=-1)

    # ------------------------------------------------------------------ batching
    def stack_latents(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """The rows' mels [n_i, T_i, mel] -> [sum n_i, T_max, mel], right-padded with zeros."""
        T = max(x.shape[1] for x in xs)
        if all(x.shape[1] == T for x in xs):
            return torch.cat(xs)
        return torch.cat([torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[1])) for x in xs])

    def request_output(self, out: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """A request's slice of the batch's prediction, without its padded frames."""
        return out[:, :latents.shape[1]]

    def batch_cond(self, conds: list[Cond]):
        """-> (columns [B, T_max, C], lengths [B] (None when all equal), None)."""
        lengths = [c.tokens.shape[0] for c in conds]
        T = max(lengths)
        if all(n == T for n in lengths):
            return torch.stack([c.tokens for c in conds]), None, None
        ctx = torch.stack([torch.nn.functional.pad(c.tokens, (0, 0, 0, T - c.tokens.shape[0])) for c in conds])
        return ctx, to_device(lengths, ctx.device), None

    def _block_diff(self, B: int, T: int, lengths: torch.Tensor | None) -> torch.Tensor:
        """The reference's block distances [B, 1, T, T] (key block - query block; the reference expands
        them over the heads, the attention broadcasts them); a real query's padded keys get a distance
        no layer attends over."""
        blocks = torch.arange(T, device=self.device) // self.block_size
        diff = (blocks[None, :] - blocks[:, None]).expand(B, T, T)
        if lengths is not None:
            pos = torch.arange(T, device=self.device)
            pad_key = pos[None, None, :] >= lengths[:, None, None]
            real_query = pos[None, :, None] < lengths[:, None, None]
            diff = diff.masked_fill(pad_key & real_query, _FAR)
        return diff[:, None]

    # ------------------------------------------------------------------ transformer
    @property
    def has_text_encoder(self) -> bool:
        return False

    @property
    def caption_dim(self) -> int:
        c = self.transformer.config
        return c.enc_dim + c.emb_dim + c.enc_emb_dim

    def encode_prompt(self, prompts):
        _bad("prompt", "this model synthesizes speech from codec tokens; it has no text encoder")

    def project(self, embeds, mask) -> Cond:
        _bad("prompt_embeds", "this model takes codec tokens (speech=SpeechInput(...)), not prompt_embeds")

    def embed(self, x, t, ctx, ctx_bias, pooled, shapes=()) -> BlockState:
        """Mels [B, T, mel] + times [B] + columns [B, T, C] (+ lengths [B]) -> the state before block 0.
        ``BlockState.ctx`` holds the rotary cos/sin [B, 2, T, head_dim], ``ctx_bias`` the block distances."""
        dit = self.transformer
        temb = dit.time_embed(t)
        h = dit.input_embed.proj(torch.cat((x, ctx), dim=-1))
        B, T = h.shape[:2]
        pos = torch.arange(T, device=h.device)[None].repeat(B, 1)
        cos, sin = dit.rotary_embed(h, pos)
        return BlockState(h, torch.stack([cos, sin], dim=1), self._block_diff(B, T, ctx_bias), temb, temb, (T, 1))

    def run_block(self, i: int, st: BlockState) -> None:
        st.x = self.block_fns[i](st.x, st.temb, position_embeddings=(st.ctx[:, 0], st.ctx[:, 1]),
                                 block_diff=st.ctx_bias)

    def modulated_input(self, st: BlockState) -> torch.Tensor:
        raise NotImplementedError("token2wav has no step cache")

    def final(self, st: BlockState) -> torch.Tensor:
        return self.transformer.proj_out(self.transformer.norm_out(st.x, st.temb))

    # ------------------------------------------------------------------ vocoder
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Mels [B, T, mel] -> waveforms [B, T * hop] float32 on the CPU (in [-1, 1]). Through ``vocoder_graphs``
        where the engine set one (omni_ray/dit/vocoder_graphs.py: CUDA graphs per (row bucket, mel length) on
        CUDA, the eager forward otherwise), else transformers' forward."""
        if self.vocoder_graphs is not None:
            return self.vocoder_graphs.decode(latents)
        mel = to_device(latents, self.device, torch.float32).permute(0, 2, 1)   # streamed windows' mels: from the host
        wave = self.vae(mel)                                    # the vocoder squeezes: [samples] when B == 1
        return wave.reshape(latents.shape[0], -1).float().cpu()
