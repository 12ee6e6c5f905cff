"""Log-probabilities over HTTP: the model's own log-softmax, in OpenAI's shapes, and
lm-evaluation-harness scoring a served model exactly as it scores the exported one."""

from __future__ import annotations

import openai
import pytest
import torch

import corral

pytestmark = pytest.mark.slow

BASE, CHAT = "corral-base", "corral-chat"


@pytest.fixture(scope="module")
def client(engine_app) -> openai.OpenAI:
    """Each engine in turn (corral's, then vLLM's on the same models)."""
    return openai.OpenAI(base_url=engine_app.v1, api_key="unused", max_retries=0, timeout=120)


def reference_logprobs(path, ids: list[int]) -> torch.Tensor:
    """log-softmax of the checkpoint's fp32 logits over `ids`: row t predicts token t + 1."""
    with torch.no_grad():
        return torch.log_softmax(corral.load_model(path)(torch.tensor([ids]))[0].float(), dim=-1)


def piece_ids(tokenizer, pieces: list[str]) -> list[int]:
    return [tokenizer.sp.piece_to_id(p.replace(" ", "\u2581")) for p in pieces]


def test_completion_logprobs_and_echo_are_the_models_log_softmax(client, checkpoints, tokenizer):
    prompt = "The king said to the queen"
    out = client.completions.create(model=BASE, prompt=prompt, max_tokens=6, temperature=0, logprobs=3, echo=True)
    choice, prompt_ids = out.choices[0], tokenizer.encode(prompt)
    lp = choice.logprobs
    assert out.usage.prompt_tokens == len(prompt_ids) and out.usage.completion_tokens == 6
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt_ids) + 6
    assert choice.text.startswith(prompt)
    ids = piece_ids(tokenizer, lp.tokens)
    assert ids[: len(prompt_ids)] == prompt_ids
    reference = reference_logprobs(checkpoints.base, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    for t in range(1, len(ids)):
        assert lp.token_logprobs[t] == pytest.approx(reference[t - 1, ids[t]].item(), abs=1e-5)
        top = reference[t - 1].topk(3)
        expected = {tokenizer.sp.id_to_piece(i).replace("\u2581", " "): v for i, v in
                    zip(top.indices.tolist(), top.values.tolist())}
        assert lp.top_logprobs[t] == pytest.approx(expected, abs=1e-5)
    # greedy: every generated token is its position's most likely
    assert all(lp.token_logprobs[t] == max(lp.top_logprobs[t].values()) for t in range(len(prompt_ids), len(ids)))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_a_batch_of_token_id_prompts_gets_a_choice_each(client, tokenizer):
    prompts = [tokenizer.encode("Now is the winter"), tokenizer.encode("To be or not")]
    out = client.completions.create(model=BASE, prompt=prompts, max_tokens=1, temperature=0, logprobs=1, echo=True)
    assert [c.index for c in out.choices] == [0, 1]
    for choice, ids in zip(out.choices, prompts):
        assert len(choice.logprobs.token_logprobs) == len(ids) + 1
    assert out.usage.prompt_tokens == sum(map(len, prompts)) and out.usage.completion_tokens == 2


def test_chat_logprobs_streamed_or_not(client, registered_chat):
    messages = [{"role": "user", "content": "Speak of the sea."}]
    kwargs = dict(model=CHAT, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 and t.logprob == t.top_logprobs[0].logprob
               for t in content)  # greedy: the chosen token is the most likely
    streamed = [t for c in client.chat.completions.create(**kwargs, stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = client.chat.completions.create(model=CHAT, messages=messages, max_tokens=8, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == whole.choices[0].message.content


def test_lm_eval_scores_the_endpoint_as_it_scores_the_checkpoint(serve_app, checkpoints, tmp_path):
    """lm-evaluation-harness as the client (`local-completions`: echo + logprobs) against its own
    Hugging Face model on the exported weights and the `corral` model type on the checkpoint, on
    local tasks in MMLU's and HellaSwag's formats: the same log-likelihood for every choice and
    the same accuracies."""
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from corral.harness import TASKS_DIR

    tasks = ["mmlu_tiny", "hellaswag_tiny"]
    hf = corral.export_hf(checkpoints.base, tmp_path / "hf")

    def evaluate(model: str, model_args: dict) -> dict:
        results = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                          task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
                                          batch_size=1)
        return {task: {"metrics": results["results"][task], "loglikelihoods": [
            [r[0][0] for r in s["resps"]] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]}
            for task in tasks}

    served = evaluate("local-completions", {"base_url": f"{serve_app.v1}/completions", "model": BASE,
                                            "tokenizer": str(hf), "tokenizer_backend": "huggingface",
                                            "add_bos_token": True, "max_retries": 1, "num_concurrent": 1})
    local = evaluate("hf", {"pretrained": str(hf), "dtype": "float32", "add_bos_token": True, "device": "cpu"})
    mine = evaluate("corral", {"pretrained": str(checkpoints.base)})
    for task in tasks:
        assert len(served[task]["loglikelihoods"]) == 12
        for other in (local, mine):
            for a, b in zip(served[task]["loglikelihoods"], other[task]["loglikelihoods"]):
                assert a == pytest.approx(b, abs=1e-4)
            for metric in ("acc,none", "acc_norm,none"):
                assert served[task]["metrics"][metric] == other[task]["metrics"][metric], (task, metric)
