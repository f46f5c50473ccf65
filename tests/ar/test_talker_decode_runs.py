"""The talker's decode steps in decode runs (multi-step, queued behind the run in flight; on CUDA the same
runs replay the decode graphs): per-step input rows from the device buffer (``worker/step_rows.py``) and
the repetition penalty on the device (``worker/seen_tokens.py``) give exactly the tokens of the eager path
(one forward a step, rows and penalty from the host), greedy and seeded; streamed rows bound each run."""

import pytest
import torch

from omni_ray.ar.input_embeds import InputEmbeds
from omni_ray.ar.layers.sampler import apply_repetition_penalty
from omni_ray.ar.models.qwen2_5_omni_talker_inputs import TalkerInput, talker_sampling_params
from omni_ray.ar.sampling_params import SamplingParams
from omni_ray.ar.sequence import Sequence
from omni_ray.ar.worker.seen_tokens import SeenTokens
from omni_ray.ar.worker.step_rows import StepRows
from tests.ar.conftest import make_llm


def _seq(tokens: list[int], embeds: InputEmbeds | None = None, penalty: float = 1.0) -> Sequence:
    return Sequence(tokens, SamplingParams(repetition_penalty=penalty), input_embeds=embeds)


def test_step_rows_fill_each_runs_rows():
    """Row [j, i] of a run is what sequence i adds at its decode step (tokens so far - prompt - 1 + offset +
    j): its pushed rows, then the tail; zero for a sequence without rows and for padding rows."""
    w = 3
    rows = torch.arange(1, 13, dtype=torch.float32).view(4, w)
    a = _seq([5] * 4 + [7], InputEmbeds(torch.zeros(4, w), steps=rows, tail=-torch.ones(w)))   # at step 0
    b = _seq([5] * 2 + [7, 8, 9], InputEmbeds(torch.zeros(2, w), steps=rows[:1]))  # at step 2: past its rows
    c = _seq([1, 2, 3])                                                              # a plain request
    buf = StepRows(steps=3, max_rows=4, width=w, dtype=torch.float32, device=torch.device("cpu"))
    buf.fill([a, b, c], num_steps=3, bs=4, buf=0)
    got = buf.view(4)
    assert torch.equal(got[:, 0], rows[:3]) and torch.equal(got[:, 1:], torch.zeros(3, 3, w))
    buf.fill([a, b, c], num_steps=2, bs=4, buf=1, offset=2)          # a run queued 2 steps ahead
    assert torch.equal(got[0, 0], rows[2]) and torch.equal(got[1, 0], rows[3])
    assert torch.equal(buf.view(4)[2, 0], rows[2])                   # step 3 of the buffer: untouched
    idx, vals = buf.read(torch.tensor([1]), 4)
    assert idx.tolist() == [0, 1, 2, 3] and torch.equal(vals[0], rows[3])
    buf.fill([a], num_steps=1, bs=1, buf=0, offset=4)                # past the pushed rows: the tail
    assert torch.equal(buf.view(1)[0, 0], -torch.ones(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_seen_tokens_penalty_equals_list_penalty(dtype):
    """The device mask's penalty equals the per-token-list one (transformers' processor, see
    test_omni_talker_engine), bit for bit, before and after the drawn tokens join; a row without a
    penalty is left as it is."""
    g = torch.Generator().manual_seed(0)
    vocab = 40
    seqs = [_seq(torch.randint(0, vocab, (9,), generator=g).tolist(), penalty=1.3),
            _seq([3, 3, 4], penalty=1.0),
            _seq(torch.randint(0, vocab, (5,), generator=g).tolist(), penalty=1.05)]
    seen = SeenTokens(max_rows=4, vocab=vocab, dtype=dtype, device=torch.device("cpu"))
    seen.load(seqs)
    for drawn in ([1, 2, 3], [39, 2, 0]):
        logits = torch.randn(3, vocab, generator=g).to(dtype)
        want = logits.clone()
        apply_repetition_penalty(want, [0, 2], [seqs[0].token_ids, seqs[2].token_ids], [1.3, 1.05])
        got = logits.clone()
        seen.apply(got)
        assert torch.equal(got, want)
        seen.mark(torch.tensor(drawn))
        for s, t in zip(seqs, drawn):
            s.append_token(t)
    assert seen.distinct(seqs[0]).tolist() == sorted(set(seqs[0].token_ids))


def _talker_input(tokens, width: int, seed: int, prompt_len: int, reply: int, closed: bool = True) -> TalkerInput:
    """A talker request from random thinker states (prompt rows, ``reply`` fed thinker tokens)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    inp = TalkerInput(tokens, r(prompt_len, width), r(prompt_len, width), r(width), r(width), r(width))
    inp.add_token(r(reply, width), r(reply, width))
    if closed:
        inp.finish()
    return inp


@pytest.fixture(scope="module")
def eager():
    """The eager path: one forward a step, rows and penalty from the host (no step-row buffer)."""
    llm = make_llm("tiny:qwen2.5-omni", submodel="talker", decode_steps=1, async_decode=False)
    llm.runner.step_rows = None
    return llm


@pytest.fixture(scope="module")
def runs():
    return make_llm("tiny:qwen2.5-omni", submodel="talker", decode_steps=4, async_decode=True)


def _params(llm, seed: int | None, n: int, **kw):
    kw.update(dict(temperature=0.0) if seed is None else dict(seed=seed))
    return talker_sampling_params(llm.arch.talker, max_tokens=n, stop_token_ids=[], ignore_eos=True, **kw)


@pytest.mark.parametrize("seed", [None, 7], ids=["greedy", "seeded"])
def test_talker_runs_equal_eager(eager, runs, resumes, seed):
    """Three talker requests (different prompt and reply lengths: thinker rows, then the text-end and
    text-pad rows) with a repetition penalty (the reference's 1.05, and 1.5): multi-step runs, resumed
    while one is in flight, give the eager path's codec tokens."""
    width = runs.arch.input_size
    shapes = [(6, 3, 23), (11, 9, 17), (4, 1, 30)]          # prompt rows, thinker tokens fed, codes
    def prompts():
        return [_talker_input(runs.arch.talker, width, i, p, r).prompt() for i, (p, r, _) in enumerate(shapes)]
    params = [_params(runs, None if seed is None else seed + i, n) for i, (_, _, n) in enumerate(shapes)]
    params[0] = _params(runs, seed, shapes[0][2], repetition_penalty=1.5)    # a penalty that changes greedy codes
    want = [o["token_ids"] for o in eager.generate(prompts(), params, use_tqdm=False)]
    steps0, forwards0 = runs.stats.steps, runs.stats.forwards
    got = [o["token_ids"] for o in runs.generate(prompts(), params, use_tqdm=False)]
    assert got == want and [len(t) for t in got] == [n for _, _, n in shapes]
    assert runs.stats.forwards - forwards0 > runs.stats.steps - steps0      # multi-step runs happened
    assert resumes["resumed"] > 0


def test_streamed_rows_bound_the_runs(eager, runs):
    """Rows pushed a few at a time: each run stops where the rows end (the sequence then waits), and the
    codes equal the eager path's with every row up front."""
    width, tokens = runs.arch.input_size, runs.arch.talker
    params = _params(runs, None, 20)
    full = _talker_input(tokens, width, 3, 5, 12)
    want = eager.generate(full.prompt(), params, use_tqdm=False)[0]["token_ids"]
    rows = full.embeds._steps
    stream = InputEmbeds(full.embeds.prompt, closed=False)
    seq = runs.add_request({"prompt_embeds": stream, "prompt_token_ids": full.token_ids}, params)
    for k in (0, 2, 7, 12):                                  # rows [:k] pushed, then the engine runs dry
        if k:
            stream.push(rows[len(stream._steps):k])
        for _ in range(8):
            runs.step()
        assert seq.num_output_tokens == k + 1 and not seq.is_finished   # row k missing: it waits
    stream.close(full.embeds.tail)
    while not runs.is_finished():
        runs.step()
    assert seq.output_token_ids == want


class _Counted:
    """A decode graph whose replays are counted."""

    def __init__(self, graph, count: list[int]):
        self.graph, self.count = graph, count

    def replay(self):
        self.count[0] += 1
        self.graph.replay()


@pytest.mark.gpu
@pytest.mark.parametrize("seed", [None, 7], ids=["greedy", "seeded"])
def test_talker_graphs_equal_eager_on_cuda(seed):
    """On CUDA (float32): the talker's decode steps replay the decode graphs (step rows read from the
    device buffer, the penalty applied on the device between replays, 4-step runs) and give the codec
    tokens of the eager engine, batched."""
    kw = dict(submodel="talker", device="cuda", dtype="float32", warmup=False)
    eager = make_llm("tiny:qwen2.5-omni", enforce_eager=True, decode_steps=1, async_decode=False, **kw)
    eager.runner.step_rows = None                            # one forward a step, rows and penalty from the host
    graphs = make_llm("tiny:qwen2.5-omni", enforce_eager=False, decode_steps=4, async_decode=True, **kw)
    assert graphs.runner.step_rows is not None and graphs.runner.graphs
    count = [0]
    graphs.runner.graphs = {bs: _Counted(g, count) for bs, g in graphs.runner.graphs.items()}
    width, tokens = graphs.arch.input_size, graphs.arch.talker
    shapes = [(6, 3, 40), (11, 9, 33), (4, 1, 48)]
    params = [_params(graphs, None if seed is None else seed + i, n, repetition_penalty=1.05 + 0.2 * (i == 0))
              for i, (_, _, n) in enumerate(shapes)]
    prompts = lambda: [_talker_input(tokens, width, i, p, r).prompt() for i, (p, r, _) in enumerate(shapes)]  # noqa: E731
    want = [o["token_ids"] for o in eager.generate(prompts(), params, use_tqdm=False)]
    got = [o["token_ids"] for o in graphs.generate(prompts(), params, use_tqdm=False)]
    assert got == want
    assert count[0] >= 40                                    # the decode steps replayed the graphs
