"""Generation: the cache against full recomputation, batching against one prompt at a time, sampling."""

import pytest
import torch

from model.config import GPTConfig
from model.errors import UserError
from model.generate import few_shot_prompt, generate, sample
from model.gpt import GPT, KVCache
from model.special_tokens import SpecialIds
from support.models import perturbed

BLOCK_SIZE = 16


@pytest.fixture(scope="module", params=[["dense"], ["dense", "sparse"]], ids=["gpt2", "gpt3"])
def model(request):
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=64, block_size=BLOCK_SIZE, n_layer=2, n_head=2, n_embd=32, attention=request.param, sparse_window=5
    )
    return perturbed(GPT(config)).eval()


@torch.no_grad()
def greedy_by_recomputation(model: GPT, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """No cache: at every step run the last block_size tokens from scratch and take the argmax."""
    tokens, step_logits = list(prompt), []
    for _ in range(steps):
        logits = model(torch.tensor([tokens[-model.config.block_size :]])).logits[0, -1]
        step_logits.append(logits)
        tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :], step_logits


def record_next_token_logits(model: GPT) -> tuple[list[torch.Tensor], torch.utils.hooks.RemovableHandle]:
    seen: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda module, args, output: seen.append(output.logits[:, -1].clone()))
    return seen, handle


def test_cached_greedy_equals_recomputation_past_the_context(model):
    prompt = [5, 9, 2, 33, 7]
    steps = 3 * BLOCK_SIZE  # slides the window for two context lengths
    expected_tokens, expected_logits = greedy_by_recomputation(model, prompt, steps)
    seen, handle = record_next_token_logits(model)
    try:
        tokens = generate(model, [prompt], steps, temperature=0)[0]
    finally:
        handle.remove()
    assert tokens == expected_tokens
    assert len(seen) == steps  # one forward per step: prefill, then one token at a time (or a rebuild)
    for step, (actual, expected) in enumerate(zip(seen, expected_logits)):
        torch.testing.assert_close(actual[0], expected, atol=1e-5, rtol=1e-4, msg=f"step {step}")


@torch.no_grad()
def test_cache_fed_token_by_token_equals_full_forward(model):
    tokens = torch.randint(0, 64, (2, BLOCK_SIZE))
    full = model(tokens).logits
    cache = KVCache(model.config, batch_size=2)
    pieces = [model(tokens[:, :4], cache=cache).logits]  # a prefill of 4, then chunks of 1 and 3
    for start, end in [(4, 5), (5, 8)] + [(t, t + 1) for t in range(8, BLOCK_SIZE)]:
        output = model(tokens[:, start:end], cache=cache)
        assert output.cache is cache and cache.offset == end
        pieces.append(output.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="block_size"):
        model(tokens[:, :1], cache=cache)  # the cache is full


def test_batch_of_mixed_lengths_equals_one_prompt_at_a_time(model):
    torch.manual_seed(1)
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (3, 11, 1, 7)]
    steps = BLOCK_SIZE + 4  # the longest prompt slides past the context
    one_at_a_time = [generate(model, [prompt], steps, temperature=0)[0] for prompt in prompts]
    assert generate(model, prompts, steps, temperature=0) == one_at_a_time
    assert one_at_a_time == [greedy_by_recomputation(model, prompt, steps)[0] for prompt in prompts]


def test_prompts_that_leave_room_for_the_new_tokens_are_prefilled_once(model):
    # A context of 96: prompts up to 40 tokens would be padded to 64 slots, which with 40 new
    # tokens would fill the cache 8 tokens before the end and recompute the whole window for each
    # of them; the padding must leave the new tokens their slots instead.
    roomy = perturbed(GPT(model.config.model_copy(update={"block_size": 96}))).eval()
    torch.manual_seed(2)
    prompts = [torch.randint(0, 64, (n,)).tolist() for n in (40, 9, 23, 33)]
    fed: list[int] = []
    handle = roomy.register_forward_pre_hook(lambda module, args: fed.append(args[0].size(1)))
    try:
        tokens = generate(roomy, prompts, 40, temperature=0)
    finally:
        handle.remove()
    assert fed[0] >= 40 and fed[1:] == [1] * 39  # one prefill, then every token through the cache
    assert tokens == [greedy_by_recomputation(roomy, prompt, 40)[0] for prompt in prompts]


def test_uncached_generation_gives_the_same_tokens(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    for seed in (0, 1):
        assert generate(model, prompts, 20, seed=seed, use_cache=False) == generate(model, prompts, 20, seed=seed)


def test_top_k_1_is_greedy(model):
    prompts = [[3, 4, 5], [6]]
    assert generate(model, prompts, 20, top_k=1, seed=3) == generate(model, prompts, 20, temperature=0)


def test_each_sequence_stops_at_its_eos(model):
    prompts = [[3, 4, 5], [9, 10]]
    greedy = generate(model, prompts, 20, temperature=0)
    eos = greedy[0][4]
    stopped = generate(model, prompts, 20, temperature=0, eos_id=eos)
    assert len(stopped[0]) <= 5
    for tokens, unstopped in zip(stopped, greedy):  # up to and including the first eos, or all 20
        assert tokens == (unstopped[: unstopped.index(eos) + 1] if eos in unstopped else unstopped)


def test_seed_repeats_results(model):
    prompts = [[3, 4, 5], [9, 10]]
    first = generate(model, prompts, 24, temperature=1.5, top_k=None, seed=7)
    assert generate(model, prompts, 24, temperature=1.5, top_k=None, seed=7) == first
    assert generate(model, prompts, 24, temperature=1.5, top_k=None, seed=8) != first


def test_no_token_outside_the_top_k_is_drawn():
    torch.manual_seed(0)
    logits = torch.randn(50)
    top5 = set(sorted(range(50), key=lambda i: -logits[i].item())[:5])
    draws = sample(
        logits.repeat(4000, 1), temperature=1.0, top_k=5, top_p=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert set(draws.tolist()) == top5


def test_top_p_keeps_the_smallest_set_reaching_p():
    probabilities = {7: 0.5, 2: 0.3, 11: 0.1, 4: 0.06, 0: 0.04}
    logits = torch.full((16,), -1e9)
    for token, p in probabilities.items():
        logits[token] = torch.log(torch.tensor(p))
    generator = torch.Generator().manual_seed(0)
    for top_p, expected in [(0.4, {7}), (0.75, {7, 2}), (0.85, {7, 2, 11}), (0.95, {7, 2, 11, 4})]:
        draws = sample(logits.repeat(4000, 1), 1.0, top_k=None, top_p=top_p, generator=generator).tolist()
        assert set(draws) == expected, top_p
    draws = sample(logits.repeat(8000, 1), 1.0, top_k=None, top_p=0.75, generator=generator).tolist()
    assert draws.count(7) / len(draws) == pytest.approx(0.5 / 0.8, abs=0.03)  # renormalised over the kept set


def test_few_shot_prompt_layout():
    # A pretrained tokenizer's ids (GPT-2: end of text 50256, the others added after it).
    EOS_ID, PAD_ID, SEP_ID = 50256, 50257, 50258
    examples = [([10, 11], [20, 21, 22]), ([12], [23])]
    assert few_shot_prompt(examples, [13, 14], SpecialIds(eos=EOS_ID, pad=PAD_ID, sep=SEP_ID)) == [
        10,
        11,
        SEP_ID,
        20,
        21,
        22,
        EOS_ID,
        12,
        SEP_ID,
        23,
        EOS_ID,
        13,
        14,
        SEP_ID,
    ]


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([list(range(BLOCK_SIZE))], {}, r"prompt 0 has 16 tokens .* no room to generate"),
        ([[1], []], {}, "prompt 1 is empty"),
        ([], {}, "no prompts"),
        ([[1]], dict(top_p=0.0), "top_p"),
        ([[1]], dict(temperature=-1.0), "temperature"),
    ],
)
def test_bad_generation_arguments_are_refused(model, prompts, kwargs, message):
    with pytest.raises(UserError, match=message):
        generate(model, prompts, 4, **kwargs)
