"""Scores: the harness's accuracy on a custom multiple-choice task equals an independent computation from our model
(per-choice log-likelihoods summed by hand); the native path (through the Triton block-sparse kernels) and the
exported Hugging Face model agree; rolling log-likelihood (perplexity tasks) matches too."""
import numpy as np
import pytest
import torch

from eval_tasks import ITEMS, TASK
from sparse_dc.data.tokenizer import load_tokenizer_bytes, processor_from_bytes
from sparse_dc.eval.config import EvalConfig
from sparse_dc.eval.run import evaluate, hf_model
from sparse_dc.train.export import load_model, resolve_checkpoint, run_config

pytestmark = pytest.mark.slow


class Request:
    """The part of lm-eval's Instance a model reads."""

    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def reference(eval_run):
    """Our model (torch reference kernels) and the run's SentencePiece tokenizer, used directly."""
    root, tag = resolve_checkpoint(str(eval_run.dir))
    sp = processor_from_bytes(load_tokenizer_bytes(f"{run_config(root, tag).data.dir}/tokenizer.model"))
    return load_model(root, tag), sp


def continuation_logprob(model, context: list[int], continuation: list[int]) -> float:
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens[:, :-1]).double(), dim=-1)[0]
    return float(sum(logp[len(context) - 1 + i, t] for i, t in enumerate(continuation)))


def hand_loglikelihoods(model, sp) -> list[list[float]]:
    """log p(" " + choice | question) per item and choice; the continuation's tokens are those the whole string
    has after the question's (the harness's documented convention for causal models)."""
    out = []
    for question, choices, _ in ITEMS:
        context = sp.encode(question)
        row = []
        for choice in choices:
            whole = sp.encode(f"{question} {choice}")
            assert whole[:len(context)] == context
            row.append(continuation_logprob(model, context, whole[len(context):]))
        out.append(row)
    return out


def sample_loglikelihoods(report) -> list[list[float]]:
    samples = sorted(report["samples"][TASK], key=lambda s: s["doc_id"])
    return [[float(ll) for ll, _ in s["filtered_resps"]] for s in samples]


@pytest.fixture(scope="module")
def native_report(eval_run, tasks_dir, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSE_DC_KERNEL_BACKEND", "triton")  # the training kernels (Triton's interpreter on CPU)
        return evaluate(EvalConfig(checkpoint=str(eval_run.dir), tasks=[TASK], include_path=str(tasks_dir),
                                   batch_size=4, log_samples=True, update_ledger=False,
                                   out=str(tmp_path_factory.mktemp("native") / "results.json")))


def test_native_accuracy_equals_hand_computed_loglikelihoods(native_report, reference):
    lls = np.array(hand_loglikelihoods(*reference))
    labels = np.array([y for _, _, y in ITEMS])
    lengths = np.array([[len(c) for c in choices] for _, choices, _ in ITEMS], dtype=float)
    np.testing.assert_allclose(sample_loglikelihoods(native_report), lls, rtol=1e-5, atol=1e-4)
    scores = native_report["scores"][TASK]
    assert scores["acc"]["value"] == np.mean(lls.argmax(1) == labels)
    assert scores["acc_norm"]["value"] == np.mean((lls / lengths).argmax(1) == labels)  # per character of choice
    assert 0 < scores["acc"]["value"] < 1  # the items tell a right from a wrong answer (not all one way)
    n = len(ITEMS)
    acc = scores["acc"]["value"]
    assert scores["acc"]["stderr"] == pytest.approx(np.sqrt(acc * (1 - acc) / (n - 1)))  # sample std / sqrt(n)
    assert native_report["meta"][TASK]["n"] == n and native_report["ranks"] == 1


def test_hf_export_and_native_paths_agree(native_report, eval_run, tasks_dir, tmp_path):
    """--model hf on a run: exported to a temporary folder, scored by the harness's own HF model."""
    hf = evaluate(EvalConfig(checkpoint=str(eval_run.dir), model="hf", tasks=[TASK], include_path=str(tasks_dir),
                             batch_size=3, log_samples=True, update_ledger=False, out=str(tmp_path / "hf.json")))
    assert hf["model"] == "hf" and native_report["model"] == "native"
    assert hf["scores"] == native_report["scores"]
    np.testing.assert_allclose(sample_loglikelihoods(hf), sample_loglikelihoods(native_report), rtol=1e-5,
                               atol=1e-4)


def test_rolling_loglikelihood_matches_by_hand_and_hf(eval_run, exported, reference):
    """The native model built from the registry, as simple_evaluate(model="sparse-dc", model_args=...) does."""
    from lm_eval.api.registry import get_model

    from sparse_dc.eval.native import MODEL_NAME, SparseDCLM

    model, sp = reference
    text = "Return the number of items in the list. Raise an exception if the file does not exist."
    expected = continuation_logprob(model, [sp.eos_id()], sp.encode(text))  # scored after an EOS, as trained
    assert get_model(MODEL_NAME) is SparseDCLM
    native = SparseDCLM.create_from_arg_string(f"checkpoint={eval_run.dir}",
                                               {"batch_size": 2, "max_batch_size": 64, "device": None})
    hf = hf_model(str(exported), EvalConfig(checkpoint=str(exported), batch_size=2, device="cpu"))
    (got,) = native.loglikelihood_rolling([Request(text)], disable_tqdm=True)
    (via_hf,) = hf.loglikelihood_rolling([Request(text)], disable_tqdm=True)
    assert got == pytest.approx(expected, rel=1e-5) and via_hf == pytest.approx(expected, rel=1e-5)
