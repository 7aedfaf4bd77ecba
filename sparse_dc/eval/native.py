"""`sparse-dc` in lm-evaluation-harness's model registry: a sparse-dc checkpoint scored by the project's own model.

    lm = SparseDCLM(checkpoint="runs/my-run")                      # or, after `import sparse_dc.eval.native`:
    lm_eval.simple_evaluate(model="sparse-dc", model_args="checkpoint=runs/my-run", tasks=["arc_easy"])

The ZeRO shards are consolidated to fp32 (as `sparse-dc export` does), our Llama is rebuilt from the config the
checkpoint recorded, and block-sparse projections run through the same kernels as training (Triton on GPU; the
torch reference on CPU unless SPARSE_DC_KERNEL_BACKEND=triton), so no dense export is needed.

Scoring follows the harness's Hugging Face model (HFLM) exactly, so both paths give the same scores on the same
model: context + continuation are encoded whole and split at the context's length, the last max_length + 1
tokens are kept (left truncation), padding is on the right, and an empty context is the prefix token. The prefix
is EOS, not BOS: training documents were joined with EOS and never saw BOS (the HF path is given the same
prefix_token_id). Generation (generate_until) is not offered: evaluate an export with the hf path for that.

Data parallel: launched as several ranks (torchrun, srun; train/dist.py reads the environment), each rank scores
the share of requests the harness gives it and rank 0 gathers the metrics; NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from tqdm import tqdm

from sparse_dc.errors import SparseDCError

MODEL_NAME = "sparse-dc"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def join_process_group(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process; joins the launcher's process group when there are several
    ranks (the environment is read, not changed, for a single process)."""
    from sparse_dc.train.dist import setup_env

    denv = setup_env(dict(os.environ))
    if denv.world_size > 1:
        denv = setup_env()  # SLURM variables become the RANK/MASTER_* torch's env:// rendezvous reads
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(denv.local_rank)
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if device is None:
        device = f"cuda:{denv.local_rank}" if torch.cuda.is_available() else "cpu"
    return denv.rank, denv.world_size, torch.device(device)


@register_model(MODEL_NAME)
class SparseDCLM(TemplateLM):
    """A sparse-dc checkpoint as an lm-eval LM (log-likelihood and rolling log-likelihood requests)."""

    def __init__(self, checkpoint: str, tokenizer: str | None = None, batch_size: int | str | None = 8,
                 device: str | None = None, dtype: str = "float32", **_: Any) -> None:
        """`checkpoint`: a run folder, its checkpoints/ folder or a step_* folder; `tokenizer`: a SentencePiece
        file (default: the run's, from its prepared data directory); other harness arguments are ignored."""
        super().__init__()
        from sparse_dc.data.tokenizer import load_tokenizer_bytes, processor_from_bytes
        from sparse_dc.train.export import find_tokenizer, load_model, resolve_checkpoint, run_config

        if dtype not in _DTYPES:
            raise SparseDCError(f"dtype={dtype!r}: expected one of {', '.join(_DTYPES)}")
        if not str(batch_size or 1).isdigit() or int(batch_size or 1) < 1:
            raise SparseDCError(f"batch_size={batch_size!r}: expected an integer >= 1 (no 'auto' here)")
        self.batch_size = int(batch_size or 1)
        root, tag = resolve_checkpoint(checkpoint)
        cfg = run_config(root, tag)
        path = find_tokenizer(cfg, tokenizer)
        if path is None:
            raise SparseDCError(f"the run's data directory {cfg.data.dir} is not here: pass --tokenizer FILE "
                                "(its SentencePiece model)")
        self.sp = processor_from_bytes(load_tokenizer_bytes(path), name=path)
        self._rank, self._world_size, self._device = join_process_group(device)
        self.model = load_model(root, tag).to(device=self._device, dtype=_DTYPES[dtype])
        self.max_length = self.model.cfg.max_seq_len
        self.info = {"checkpoint": os.path.join(root, tag), "run": cfg.name, "dtype": dtype}

    # --- the harness's tokenizer interface -----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id()

    @property
    def prefix_token_id(self) -> int:
        return self.sp.eos_id()  # documents follow an EOS in training; BOS was never seen

    @property
    def tokenizer_name(self) -> str:
        return f"sparse-dc-sentencepiece-{self.sp.vocab_size()}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_: Any) -> list[int]:
        return self.sp.encode(string)  # no BOS/EOS: the exported HF tokenizer adds none either

    def get_model_info(self) -> dict[str, Any]:
        return dict(self.info)

    # --- scoring -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **_: Any) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding yields the continuation) per request."""
        # longest first, so an out-of-memory batch shows at once; equal inputs sort together
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="loglikelihood requests")
        for batch in order.get_batched(n=self.batch_size):
            rows = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in batch]
            tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
            for i, row in enumerate(rows):  # right padding: causal attention keeps it out of the real positions
                tokens[i, :len(row)] = torch.tensor(row)
            logprobs = F.log_softmax(self.model(tokens.to(self._device)).float(), dim=-1)  # (B, T, vocab)
            for (key, _, cont), row, lp in zip(batch, rows, logprobs):
                lp = lp[len(row) - len(cont):len(row)]  # the positions that predict the continuation
                target = torch.tensor(cont, device=lp.device)
                answer = (float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all()))
                results.append(answer)
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                bar.update(1)
        bar.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents in disjoint windows of max_length tokens (perplexity tasks)."""
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm or self.rank != 0,
                            desc="rolling log-likelihood"):
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(ll for ll, _ in self._loglikelihood_tokens([(None, c, t) for c, t in windows],
                                                                   disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise SparseDCError("the native model scores log-likelihoods only and these tasks generate text: evaluate "
                            "with --model hf (an exported Hugging Face model)")

    # --- data parallel (the harness splits requests by rank and gathers through these) ----------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()
