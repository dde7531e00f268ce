"""`RWKVModule`: the thin LightningModule. The long-context work is in `segments`, the optimizer in
`optim`, the network in `rwkv_infctx.model`; this class only wires them into Lightning's hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.model_file import save_state_dict
from rwkv_infctx.model.registry import family_of
from rwkv_infctx.training.boundary_states import BoundaryPlace, check_boundary_place
from rwkv_infctx.training.build import build_model
from rwkv_infctx.training.callbacks import StepMetrics
from rwkv_infctx.training.checkpointing import ResumeState
from rwkv_infctx.training.distributed import (
    full_weights,
    make_zero3_leaf,
    offloads_optimizer,
    run_on_network,
    zero_stage,
)
from rwkv_infctx.training.grad_sums import GradAccumDtype, check_grad_accum_dtype
from rwkv_infctx.training.loss import LOSS_CHUNK, check_loss_chunk
from rwkv_infctx.training.loss_norm import (
    LossNormalization,
    check_loss_normalization,
    check_step_grouping,
    loss_norm,
)
from rwkv_infctx.training.nan_guard import NanGuard, NanPolicy
from rwkv_infctx.training.optim import (
    DecayName,
    OptimConfig,
    OptimizerName,
    make_optimizer,
    make_scheduler,
    state_lr_scale,
)
from rwkv_infctx.training.segments import (
    BpttMode,
    StepReport,
    bptt_step,
    check_token_ids,
    evaluate_loss,
)
from rwkv_infctx.training.tuning import TrainMode, check_train_mode
from rwkv_infctx.training.tuning.lora import LoraInit, apply_lora, lora_options, merged_state_dict
from rwkv_infctx.training.tuning.state import apply_state_tuning, save_initial_state
from rwkv_infctx.training.wkv_flops import counting_backend, declare_wkv_work


class RWKVModule(pl.LightningModule):
    """An RWKV language model trained on samples of any length with segmented BPTT.

    Args:
        arch: Model family: rwkv4, rwkv7, or auto (detected from load_model; a new model must name it).
        load_model: RWKV-LM model file (.pth/.safetensors) to start from; null builds a new model
            from n_layer/n_embd/vocab_size with RWKV-LM's initialisation.
        ctx_len: Tokens per segment: the unit of compute and memory; samples may be any length.
        ctx_len_cutoff: Slice longer samples into pieces of this many tokens, learnt as separate
            samples (no state, no gradient between pieces). Null: no cutoff.
        n_layer: Number of blocks (read from load_model; checked against it when given).
        n_embd: Model width (read from load_model; checked when given).
        vocab_size: Vocabulary size, or "neox" (50277) / "world" (65536) (read from load_model; checked).
        dim_att: RWKV-4: time-mix width (default n_embd; read from load_model; checked when given).
        dim_ffn: Channel-mix hidden width (default 4 × n_embd; read from load_model; checked when given).
        head_size: RWKV-7: head size (default 64, as every released model; read from load_model).
        d_decay_lora: RWKV-7: decay LoRA dim (default: the released model's for that n_embd, else
            RWKV-LM's formula; read from load_model).
        d_aaa_lora: RWKV-7: in-context learning rate LoRA dim (default as d_decay_lora).
        d_mv_lora: RWKV-7: value-residual LoRA dim (default as d_decay_lora).
        d_gate_lora: RWKV-7: output gate LoRA dim (default as d_decay_lora).
        lr_init: Learning rate after warmup.
        lr_final: Learning rate reached at the end of training (trainer.max_steps or max_epochs).
        warmup_steps: Optimizer steps of linear warmup from 0 to lr_init.
        lr_decay: Shape of the decay from lr_init to lr_final: cosine, linear or exponential.
        beta1: Adam beta1.
        beta2: Adam beta2.
        adam_eps: Adam epsilon.
        weight_decay: Weight decay on matrices (embedding, head, linear weights) only.
        layerwise_lr: The family's per-parameter rates: RWKV-4 time_decay 2× and time_first 3×,
            RWKV-7 att.w0 2× the learning rate.
        optimizer: adamw, adam, or sgd (plain SGD without momentum, for exactness checks).
        bptt: full (exact gradients across segments) or truncated (state detached at each boundary).
        boundary_states: Where the input state of each segment waits for the backward (bptt: full):
            device, or cpu (host memory, pinned, copied asynchronously and brought back one segment
            ahead; bit-identical results). The one memory cost that grows with sample length.
        grad_cp: Recompute each block's activations in backward (less memory per segment, ~30% slower).
        grad_accum_dtype: dtype of the gradient sums over a sample's segments: float32 (half-precision
            gradients summed in fp32) or param (in each parameter's dtype: with bf16 weights half the
            memory, each segment's gradient rounded to bf16 once).
        loss_chunk: Positions (rows × tokens) whose logits exist at once when the head and loss are
            computed (training, validation and test): memory ~ loss_chunk × vocab_size × 4 bytes.
        compile: torch.compile each block's time-mix and channel-mix (the CPU WKV ops stay eager; the
            Triton op is one node of the graph): fuses token shift, mixing and activations; same
            results, compile time on the first steps.
        dropout: Dropout after each time-mix and channel-mix (0 disables it).
        seed: Seed of the initialisation of a new model.
        wkv_backend: WKV kernel: auto (fla for RWKV-7 and Triton for RWKV-4 on CUDA, the chunked ops
            elsewhere), chunked, fla (RWKV-7, GPU), triton (RWKV-4, GPU) or reference (debugging).
        wkv_self_check: A fast kernel (fla, Triton) checks itself at first use against the chunked op;
            on failure: warn (one warning, then the chunked op), error (stop) or off (no check).
        export: Path of the RWKV-LM .pth written at the end of fit (null: none); with train_mode
            state, the state file instead.
        export_dtype: dtype of that file: bf16 or fp32.
        peak_tflops: Accelerator peak TFLOP/s for the logged MFU (3 × forward FLOPs per token ×
            tokens/s over peak); null looks up known GPUs (H100/H200 989, A100 312, ...); no MFU on
            the CPU.
        nan_policy: On a non-finite loss or gradient: stop (naming the step and samples) or skip the step.
        loss_normalization: step_tokens: an optimizer step's loss is the mean over every learnt token
            of all its micro-batches on all ranks (the update of one process holding all its samples
            in one micro-batch); micro_batch_tokens: each micro-step is the mean over its own tokens
            (all ranks) and the step the mean of its micro-steps (`training.loss_norm`).
        train_mode: full: every weight; lora: peft LoRA adapters on the family's projections, base
            frozen; state: RWKV-7 only, a trained initial WKV state per layer, every weight frozen.
        lora_r: lora: the adapters' rank.
        lora_alpha: lora: the adapters' alpha (their output is scaled by alpha / r).
        lora_dropout: lora: dropout on the adapters' input (0 disables it).
        lora_targets: lora: module-name suffixes of the linear layers to adapt (att.key, ffn.value,
            ...); null: the family's default, every time-mix and channel-mix projection.
        lora_init: lora: default (peft's: A random, B zero) or pissa (A, B from the weights' SVD; the
            base keeps the residual).
        lora_train_also: lora: parameters trained in full besides the adapters: every parameter whose
            name contains one of these strings (ln, att.x_, att.w0, ...).
        load_adapter: lora: a peft adapter folder (adapter_config.json + adapter_model.safetensors)
            whose weights the adapters start from (same targets, rank and alpha).
        state_lr: state: the initial states' learning rate after warmup (no weight decay); the
            schedule scales it as it scales lr_init (so lr_init must be above 0).
        load_state: state: a state file (as `export` writes it) whose states training starts from;
            null: zeros.
    """

    def __init__(
        self,
        arch: Literal["auto", "rwkv4", "rwkv7"] = "auto",
        load_model: str | None = None,
        ctx_len: int = 512,
        ctx_len_cutoff: int | None = None,
        n_layer: int | None = None,
        n_embd: int | None = None,
        vocab_size: int | str | None = None,
        dim_att: int | None = None,
        dim_ffn: int | None = None,
        head_size: int | None = None,
        d_decay_lora: int | None = None,
        d_aaa_lora: int | None = None,
        d_mv_lora: int | None = None,
        d_gate_lora: int | None = None,
        lr_init: float = 6e-4,
        lr_final: float = 1e-5,
        warmup_steps: int = 0,
        lr_decay: DecayName = "cosine",
        beta1: float = 0.9,
        beta2: float = 0.99,
        adam_eps: float = 1e-8,
        weight_decay: float = 0.0,
        layerwise_lr: bool = True,
        optimizer: OptimizerName = "adamw",
        bptt: BpttMode = "full",
        boundary_states: BoundaryPlace = "device",
        grad_cp: bool = False,
        grad_accum_dtype: GradAccumDtype = "float32",
        loss_chunk: int = LOSS_CHUNK,
        compile: bool = False,
        dropout: float = 0.0,
        seed: int = 0,
        wkv_backend: str = "auto",
        wkv_self_check: Literal["warn", "error", "off"] = "warn",
        export: str | None = None,
        export_dtype: Literal["bf16", "fp32"] = "bf16",
        peak_tflops: float | None = None,
        nan_policy: NanPolicy = "stop",
        loss_normalization: LossNormalization = "step_tokens",
        train_mode: TrainMode = "full",
        lora_r: int = 32,
        lora_alpha: float = 32.0,
        lora_dropout: float = 0.0,
        lora_targets: list[str] | None = None,
        lora_init: LoraInit = "default",
        lora_train_also: list[str] | None = None,
        load_adapter: str | None = None,
        state_lr: float = 1.0,
        load_state: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if ctx_len <= 0:
            raise UserError(f"model.ctx_len: {ctx_len} (expected a positive number of tokens)")
        if ctx_len_cutoff is not None and ctx_len_cutoff <= 0:
            raise UserError(
                f"model.ctx_len_cutoff: {ctx_len_cutoff} (expected a positive number of tokens or null)"
            )
        check_grad_accum_dtype(grad_accum_dtype)
        check_loss_chunk(loss_chunk)
        check_boundary_place(boundary_states)
        check_loss_normalization(loss_normalization)
        self.optim = OptimConfig(
            optimizer,
            lr_init,
            lr_final,
            warmup_steps,
            lr_decay,
            beta1,
            beta2,
            adam_eps,
            weight_decay,
            layerwise_lr,
            state_lr=state_lr,
        )
        dims = {
            "n_layer": n_layer,
            "n_embd": n_embd,
            "vocab_size": vocab_size,
            "dim_att": dim_att,
            "dim_ffn": dim_ffn,
            "head_size": head_size,
            "d_decay_lora": d_decay_lora,
            "d_aaa_lora": d_aaa_lora,
            "d_mv_lora": d_mv_lora,
            "d_gate_lora": d_gate_lora,
        }
        self.model = build_model(
            load_model,
            dims,
            dropout=dropout,
            seed=seed,
            wkv_backend=wkv_backend,
            arch=arch,
            wkv_self_check=wkv_self_check,
        )
        check_train_mode(train_mode, family_of(self.model).name)
        lora_args = (lora_r, lora_alpha, lora_dropout, lora_targets, lora_init, lora_train_also)
        lora = lora_options(train_mode, *lora_args, load_adapter)
        if lora is not None:
            apply_lora(self.model, lora, seed)
        if train_mode == "state":
            state_lr_scale(self.optim)  # refuses lr_init 0 now, not when the optimizer is built
            apply_state_tuning(self.model, load_state, export)
        elif load_state is not None:
            raise UserError(
                f"model.load_state: {load_state} is set, but model.train_mode is {train_mode} "
                "(expected train_mode: state)"
            )
        self.last_report: StepReport | None = None
        self._zero3 = False
        self._compiled = False
        # one ctx_len segment at batch 1: Lightning's model summary measures its forward FLOPs
        self.example_input_array = torch.zeros(1, ctx_len, dtype=torch.long)

    @torch.compiler.disable  # the summary's FLOP counter runs it: plain eager ops
    def forward(self, tokens_BT: Tensor) -> Tensor:
        """Greedy next-token ids (B, T) for every position, from a fresh state: one forward of the
        network, the head applied loss_chunk positions at a time (logits never exist all at once).

        Lightning's model summary runs it on `example_input_array`, so its Total FLOPs is the forward
        FLOPs of one segment: the matmuls it measures plus the WKV work declared here
        (`training.wkv_flops`), i.e. `ctx_len ×` the family's `forward_flops_per_token`. While a FLOP
        counter runs, the WKV goes through the reference op (`wkv_flops.counting_backend`).
        """
        wkv_flops = family_of(self.model).wkv_flops_per_token(self.model.cfg)

        def predict(net, _):
            with counting_backend(self.model, tokens_BT.device):
                h_BTC, _ = net.hidden(tokens_BT)
            rows = h_BTC.flatten(0, 1).split(self.hparams.loss_chunk)
            ids = torch.cat([net.head(rows_tC).argmax(-1) for rows_tC in rows])
            declare_wkv_work(h_BTC, round(wkv_flops * tokens_BT.numel()))
            return ids.view(tokens_BT.shape)

        # always as one hooked call of the network (as under ZeRO-3, where it also gathers the
        # weights): the model summary then attributes the FLOPs and the output size to `model`
        return run_on_network(self.model, predict, zero3=True)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Returns bptt_step's proxy (value 0); the real loss is logged by StepMetrics after backward."""
        check_token_ids(batch, self.model.cfg.vocab_size)
        hp = self.hparams
        # the step's tokens on all ranks, and the strategies' averaging undone (training.loss_norm)
        n_norm, scale = loss_norm(batch, hp.loss_normalization, self.trainer, batch_idx)

        def step(net, anchor):
            return bptt_step(
                net,
                batch,
                hp.ctx_len,
                hp.ctx_len_cutoff,
                hp.bptt,
                hp.grad_cp,
                n_norm,
                anchor,
                grad_accum_dtype=hp.grad_accum_dtype,
                loss_chunk=hp.loss_chunk,
                boundary_states=hp.boundary_states,
            )

        proxy, self.last_report = run_on_network(self.model, step, self._zero3, batch["input_ids"].device)
        return proxy * scale if scale != 1 else proxy

    def on_train_epoch_start(self) -> None:
        check_step_grouping(self.trainer, self.hparams.loss_normalization)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._log_eval("val_loss", batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._log_eval("test_loss", batch)

    def _log_eval(self, name: str, batch: dict[str, Tensor]) -> None:
        check_token_ids(batch, self.model.cfg.vocab_size)
        hp = self.hparams

        def evaluate(net, _):
            return evaluate_loss(net, batch, hp.ctx_len, hp.ctx_len_cutoff, loss_chunk=hp.loss_chunk)

        report = run_on_network(self.model, evaluate, self._zero3)
        # batch_size = tokens: the epoch mean is weighted by tokens, like the training loss
        self.log(name, report.loss, prog_bar=True, batch_size=max(int(report.n_tokens), 1), sync_dist=True)

    def configure_optimizers(self):
        offload = self._trainer is not None and offloads_optimizer(self.trainer.strategy)
        optimizer = make_optimizer(self.model, self.optim, cpu_offload=offload)
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        scheduler = make_scheduler(optimizer, self.optim, float(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self):
        return [StepMetrics(self.hparams.peak_tflops), NanGuard(self.hparams.nan_policy), ResumeState()]

    def configure_model(self) -> None:
        """model.compile: once, before DDP or DeepSpeed wrap the module (Lightning calls this in fit,
        validate and test)."""
        if self.hparams.compile and not self._compiled:
            compile_mixers(self.model)
            self._compiled = True

    def setup(self, stage: str) -> None:
        """Refuse data whose token ids do not fit the model, before anything else runs."""
        check = getattr(self.trainer.datamodule, "check_vocab_size", None)
        if check is not None:
            check(self.model.cfg.vocab_size)
        self._zero3 = zero_stage(self.trainer.strategy) == 3
        if self._zero3:
            make_zero3_leaf(self.model)

    def on_fit_end(self) -> None:
        if not self.hparams.export:
            return
        with full_weights(self.model, self.trainer.strategy):  # collective under ZeRO-3: every rank
            if self.trainer.is_global_zero:
                path = Path(self.hparams.export)
                path.parent.mkdir(parents=True, exist_ok=True)
                if self.hparams.train_mode == "state":  # a state file: the weights did not change
                    save_initial_state(self.model, path)
                    rank_zero_info(f"exported the final initial states to {path} (a state file, fp32)")
                    return
                lora = self.hparams.train_mode == "lora"
                sd = merged_state_dict(self.model) if lora else self.model.state_dict()
                save_state_dict(sd, path, self.hparams.export_dtype)
                rank_zero_info(f"exported the final model to {path} ({self.hparams.export_dtype})")


def compile_mixers(model: nn.Module) -> None:
    """torch.compile every block's time-mix and channel-mix in place (state_dict keys unchanged).

    Not whole blocks: block 0's ln0 branch makes dynamo specialise each block on its layer_id, and
    the graph variants (layers × grad mode × shapes) pass its recompile limit in the first step. The
    mixers are the same code in every layer, so all layers share their graphs. Shapes are compiled
    dynamic, so a shorter last segment does not recompile; the WKV op is not compiled (a graph break
    in the time-mix) and keeps its hand-written backward.
    """
    for block in model.blocks:
        block.att.compile(dynamic=True)
        block.ffn.compile(dynamic=True)
