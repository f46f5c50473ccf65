"""M-RoPE / TMRoPE position ids of a multimodal prompt (Qwen2.5-VL, Qwen2.5-Omni thinker).

A prompt's tokens get three position rows (temporal, height, width). Text tokens have all three
equal and count up by one. A run of placeholder tokens of an image or video (``grid_thw`` in
patches; ``spatial_merge_size``² patches per token) gets ``(t * time_step, h, w) + start`` in
t-major, h, w order; audio tokens (Omni) count up by one like text, at their own start. Every
block starts one past the previous block's largest position, so the text after an image continues
from ``start + max(h, w) / merge``. Omni's audio-in-video (``use_audio_in_video``): the video's
and its audio's tokens interleave chunk by chunk (``seconds_per_chunk``); the two start tokens
(``<|vision_bos|><|audio_bos|>``) share one position, as do the two end tokens.

Decode continues from ``rope_delta``: the token at sequence index ``i >= T`` has all three
positions ``i + rope_delta`` (``delta = max position + 1 - T``), i.e. a plain 1-D position.

Everything here runs once per request (prefill preparation), on the CPU, in Python over media
items, never per token of text; a text-only prompt never comes here (its positions are 1-D).

One deliberate difference from transformers 5.25's ``Qwen2_5_VLModel.get_rope_index``: there the
text after a *video* restarts at ``start + max(h, w) / merge`` even when the video's temporal
positions went further (and its ``rope_deltas`` still use the maximum, so decode jumps). Here, as
in the original Qwen2.5-VL code (transformers 4.49-5.2), vLLM and transformers' own Omni code, the
text continues one past the video's largest position. The two agree for every image and for any
video whose temporal span is below its spatial one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omni_ray.errors import ConfigError, InvalidRequestError
from omni_ray.rules import check_prompt

IMAGE, VIDEO, AUDIO = 1, 2, 3
AUDIO_IN_VIDEO = 4


@dataclass(frozen=True)
class MRopeSpec:
    """What the position rules need from a checkpoint's config."""
    family: str                       # "qwen2_5_vl" | "qwen2_5_omni"
    image_token_id: int
    video_token_id: int
    audio_token_id: int | None        # Omni only
    spatial_merge_size: int
    time_scale: float                 # positions per second: VL tokens_per_second, Omni position_id_per_seconds
    seconds_per_chunk: float = 2.0    # Omni audio-in-video interleaving

    @classmethod
    def from_hf(cls, cfg: dict) -> "MRopeSpec | None":
        """From a top-level config.json dict; None for text-only families."""
        mt = cfg.get("model_type")
        if mt == "qwen2_5_vl":
            vision = cfg.get("vision_config") or {}
            return cls("qwen2_5_vl", _req(cfg, "image_token_id"), _req(cfg, "video_token_id"), None,
                       vision.get("spatial_merge_size", 2), float(vision.get("tokens_per_second", 2)))
        if mt in ("qwen2_5_omni", "qwen2_5_omni_thinker"):
            th = cfg["thinker_config"] if mt == "qwen2_5_omni" else cfg
            vision = th.get("vision_config") or {}
            return cls("qwen2_5_omni", _req(th, "image_token_index", "image_token_id"),
                       _req(th, "video_token_index", "video_token_id"),
                       _req(th, "audio_token_index", "audio_token_id"), vision.get("spatial_merge_size", 2),
                       float(th.get("position_id_per_seconds", 25)), float(th.get("seconds_per_chunk", 2)))
        return None


def _req(cfg: dict, *keys: str) -> int:
    for k in keys:
        if cfg.get(k) is not None:
            return int(cfg[k])
    raise ConfigError(f"config.json has none of {keys}")


@dataclass
class _Run:
    kind: int
    start: int
    end: int                          # exclusive


def media_runs(input_ids: torch.Tensor, spec: MRopeSpec, use_audio_in_video: bool = False) -> list[_Run]:
    """Maximal runs of one kind of placeholder token, in prompt order (vectorised over tokens).
    With ``use_audio_in_video`` a video run and the audio runs interleaved with it form one run."""
    if input_ids.numel() == 0:
        check_prompt([])                                                    # the one prompt rule: raises
    kind = torch.zeros_like(input_ids)                                      # [T]
    kind[input_ids == spec.image_token_id] = IMAGE
    kind[input_ids == spec.video_token_id] = VIDEO
    if spec.audio_token_id is not None:
        kind[input_ids == spec.audio_token_id] = AUDIO
    change = torch.nonzero(kind[1:] != kind[:-1]).flatten() + 1           # where a run starts
    starts = [0] + change.tolist()
    ends = starts[1:] + [len(input_ids)]
    av = (VIDEO, AUDIO, AUDIO_IN_VIDEO)
    runs: list[_Run] = []
    for k, s, e in zip(kind[starts].tolist(), starts, ends):
        if k == 0:
            continue
        if use_audio_in_video and runs and runs[-1].end == s and runs[-1].kind in av and k in av:
            runs[-1] = _Run(AUDIO_IN_VIDEO, runs[-1].start, e)           # video and its audio, interleaved
        else:
            runs.append(_Run(k, s, e))
    return runs


def _text(start: int, n: int) -> torch.Tensor:
    """[3, n]: n text positions from ``start``."""
    return (torch.arange(n, dtype=torch.long) + start).expand(3, n)


def _vision(start: int, grid: list[int], merge: int, t_index: torch.Tensor) -> torch.Tensor:
    """[3, t*h*w]: (t_index[t], h, w) + start for a grid of (t, h * merge, w * merge) patches."""
    t, h, w = len(t_index), grid[1] // merge, grid[2] // merge
    tt = t_index.view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def _t_index(spec: MRopeSpec, grid_t: int, seconds: float | None) -> torch.Tensor:
    """Temporal positions of a vision item's grid steps: images one step per ``grid_t`` (VL) or
    ``position_id_per_seconds`` (Omni); videos ``seconds`` per step times the time scale."""
    steps = torch.arange(grid_t)
    if seconds is None:
        return steps if spec.family == "qwen2_5_vl" else (steps * spec.time_scale).long()
    if spec.family == "qwen2_5_vl":
        return (steps * (spec.time_scale * seconds)).long()
    return (steps * torch.tensor(seconds, dtype=torch.float32) * spec.time_scale).long()


def _chunks(values: torch.Tensor, per_chunk: int, origin: int) -> list[tuple[int, int]]:
    """transformers' ``get_chunked_index``: cut ``values`` (non-decreasing positions) where
    ``value - origin`` passes the next multiple of ``per_chunk``; one cut per token at most."""
    cuts, start, chunk = [], 0, 1
    for i, v in enumerate((values - origin).tolist()):
        if v >= chunk * per_chunk:
            cuts.append((start, i))
            start, chunk = i, chunk + 1
    cuts.append((start, len(values)))
    return cuts


def _interleave(start: int, video: torch.Tensor, audio_len: int, spec: MRopeSpec) -> list[torch.Tensor]:
    """Audio-in-video: video [3, Nv] and audio positions, both from ``start``, in chunk order
    (video chunk j, then audio chunk j)."""
    audio = _text(start, audio_len)
    per = int(spec.time_scale * spec.seconds_per_chunk)
    vc, ac = _chunks(video[0], per, start), _chunks(audio[0], per, start)
    out = []
    for j in range(max(len(vc), len(ac))):
        if j < len(vc):
            out.append(video[:, vc[j][0]:vc[j][1]])
        if j < len(ac):
            out.append(audio[:, ac[j][0]:ac[j][1]])
    return out


def _count(grid: list[int], merge: int) -> int:
    return grid[0] * grid[1] * grid[2] // (merge * merge)


def mrope_positions(input_ids: torch.Tensor, spec: MRopeSpec, image_grid_thw: torch.Tensor | None = None,
                    video_grid_thw: torch.Tensor | None = None, second_per_grid_ts=None,
                    use_audio_in_video: bool = False) -> tuple[torch.Tensor, int]:
    """input_ids [T] -> (positions [3, T] int64, rope_delta). ``image_grid_thw`` / ``video_grid_thw``
    [n, 3] in patches, in prompt order; ``second_per_grid_ts`` [n_videos] seconds per temporal grid
    step (1.0 when absent). Audio items need nothing: each audio run's length is its token count."""
    ids = torch.as_tensor(input_ids).flatten().cpu()
    images = iter(torch.as_tensor(image_grid_thw).tolist() if image_grid_thw is not None else [])
    videos = iter(torch.as_tensor(video_grid_thw).tolist() if video_grid_thw is not None else [])
    seconds = iter(torch.as_tensor(second_per_grid_ts).tolist() if second_per_grid_ts is not None else [])
    blocks: list[torch.Tensor] = []
    cursor, nxt = 0, 0
    for run in media_runs(ids, spec, use_audio_in_video):
        gap = run.start - cursor
        if run.kind == AUDIO_IN_VIDEO:              # <|vision_bos|><|audio_bos|> share a position
            if gap < 2 or run.end + 2 > len(ids):
                raise InvalidRequestError("audio in video needs two start and two end tokens around it")
            blocks += [_text(nxt, gap - 1), _text(nxt + gap - 2, 1)]
            nxt += gap - 1
        else:
            blocks.append(_text(nxt, gap))
            nxt += gap
        media = _media_blocks(run, nxt, spec, images, videos, seconds, ids)
        blocks += media
        nxt = int(media[-1].max()) + 1
        cursor = run.end
        if run.kind == AUDIO_IN_VIDEO:              # <|audio_eos|><|vision_eos|> share one too
            blocks.append(_text(nxt, 1).expand(3, 2))
            nxt, cursor = nxt + 1, cursor + 2
    blocks.append(_text(nxt, len(ids) - cursor))
    pos = torch.cat(blocks, dim=1)                                          # [3, T]
    if pos.shape[1] != len(ids):
        raise InvalidRequestError(f"placeholder layout does not match the prompt ({pos.shape[1]} != {len(ids)})")
    return pos, int(pos.max()) + 1 - len(ids)


def _media_blocks(run: _Run, start: int, spec: MRopeSpec, images, videos, seconds, ids) -> list[torch.Tensor]:
    """Position blocks [3, n] of one media run starting at ``start``."""
    n = run.end - run.start
    merge = spec.spatial_merge_size
    if run.kind == AUDIO:
        return [_text(start, n)]
    if run.kind == IMAGE:
        grid = _next(images, "image_grid_thw")
        _check(n, _count(grid, merge), "image")
        return [_vision(start, grid, merge, _t_index(spec, grid[0], None))]
    grid = _next(videos, "video_grid_thw")
    video = _vision(start, grid, merge, _t_index(spec, grid[0], float(next(seconds, 1.0))))
    if run.kind == VIDEO:
        _check(n, video.shape[1], "video")
        return [video]
    audio_len = int((ids[run.start:run.end] == spec.audio_token_id).sum())
    _check(n - audio_len, video.shape[1], "video")
    return _interleave(start, video, audio_len, spec)


def _next(it, name: str) -> list[int]:
    item = next(it, None)
    if item is None:
        raise InvalidRequestError(f"the prompt has more placeholder runs than rows of {name}")
    return [int(x) for x in item]


def _check(tokens: int, expected: int, what: str) -> None:
    if tokens != expected:
        raise InvalidRequestError(f"{what} placeholder run of {tokens} tokens, its grid gives {expected}")
