"""Streamed windows' mels vocoded together: the token2wav stage's streams each finish windows in the
same engine steps (their windows share forwards), and BigVGAN is convolutional, so the mels of equal
length that are handed in during one event-loop turn go through the vocoder as one batch, on the
engine's worker thread between steps (``AsyncDiTEngine.run_between_steps``), instead of one call each.

    vocoder = VocoderBatcher(async_engine)
    audio = await vocoder.decode(stream.vocoder_input(window, mel))     # float32 samples [T * hop] (CPU)
    pcm = stream.trim(window, audio)
"""

from __future__ import annotations

import asyncio

import torch


class VocoderBatcher:
    def __init__(self, engine, max_batch: int = 16):
        self.engine = engine                      # an AsyncDiTEngine over a speech family
        self.max_batch = max_batch
        self._pending: list[tuple[torch.Tensor, asyncio.Future]] = []
        self._flush: asyncio.Task | None = None
        self.calls = 0                            # vocoder batches run
        self.mels = 0                             # mels vocoded

    async def decode(self, mel: torch.Tensor) -> torch.Tensor:
        """One mel [T, mel_dim] -> its waveform [T * hop] (float32, CPU), batched with the other mels
        handed in this turn."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._pending.append((mel, fut))
        if self._flush is None:
            self._flush = loop.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        await asyncio.sleep(0)                    # let the other streams woken by the same step hand theirs in
        batch, self._pending, self._flush = self._pending, [], None
        try:
            waves = await self.engine.run_between_steps(self._decode_all, [m for m, _ in batch])
        except BaseException as err:              # every waiter gets the error (e.g. the engine died)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            if not isinstance(err, Exception):
                raise
            return
        for (_, fut), w in zip(batch, waves):
            if not fut.done():                    # a waiter cancelled meanwhile (its client left)
                fut.set_result(w)

    @torch.no_grad()
    def _decode_all(self, mels: list[torch.Tensor]) -> list[torch.Tensor]:
        fam = self.engine.engine.family
        out: list[torch.Tensor | None] = [None] * len(mels)
        groups: dict[int, list[int]] = {}
        for i, m in enumerate(mels):
            groups.setdefault(m.shape[0], []).append(i)
        for idx in groups.values():
            for a in range(0, len(idx), self.max_batch):
                part = idx[a:a + self.max_batch]
                waves = fam.decode(torch.stack([mels[i] for i in part]))      # [B, samples] float32 CPU
                for i, w in zip(part, waves):
                    out[i] = w
                self.calls += 1
                self.mels += len(part)
        return out
