"""`Trainer` subclass with the MDLM loss and masked-diffusion evaluation."""

from __future__ import annotations

import contextlib
import functools

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerCallback

from dataset_scripts import shard_for_process
from metrics import PerGeneMarginal
from pipelines import MaskedRankDiffusionScheduler, ReferenceCells

from .arguments import BATCHES_PER_GROUP, ema_decay_for
from .checkpoints import CheckpointCompleteCallback, check_resumable, last_complete_checkpoint
from .ema import EMACallback
from .evaluation import condition_inputs, evaluate_masked_diffusion
from .loss import masked_nelbo, masked_ordinal


class DivergenceCallback(TrainerCallback):
    """Stops a run whose logged loss is NaN or infinite (its weights are then NaN too): an error naming the step,
    instead of a pipeline folder of NaN weights at the end."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        bad = {k: v for k, v in (logs or {}).items() if k in ("loss", "eval_loss") and not np.isfinite(v)}
        if bad:
            raise RuntimeError(f"training diverged at step {state.global_step}: {bad}; lower --learning_rate or the "
                               "loss weights (--ordinal_weight)")  # fmt: skip


def sorted_into_batches(block: dict[str, list], index: list[int], column: str, batch_size: int, seed: int) -> dict:
    """Cut one block of streamed cells (a batched map's single row: each column's values over the block) into
    batches of `batch_size` cells, the block sorted by `column` first (stably: the stream's order holds within a
    value), so most batches hold cells of one value of it; the batches come in an order drawn from `seed` and the
    block's `index`, so consecutive steps do not run through the values in turn."""
    block = {name: np.asarray(values[0]) for name, values in block.items()}
    order = np.argsort(block[column].astype(str), kind="stable")
    starts = np.arange(0, len(order), batch_size)
    starts = starts[np.random.default_rng([seed, index[0]]).permutation(len(starts))]
    return {name: [values[order[i : i + batch_size]] for i in starts] for name, values in block.items()}


class RankDiffusionTrainer(Trainer):
    """Trains a RankDiT denoiser on the MDLM negative ELBO, plus an optional ordinal term.

    Each step draws times stratified over the global batch (all processes and accumulation steps), masks tokens
    with the scheduler's forward process (padding never), and returns the NELBO-weighted cross-entropy of masked
    tokens + `ordinal_weight` x the ordinal term ([`masked_ordinal`]), divided by the number of real tokens in the
    (accumulated) batch, as MDLM reports it.
    The NELBO and the ordinal term are logged apart from the total (`nelbo`, `ordinal`). `evaluate` scores
    validation cells beside the per-gene marginal, with the EMA weights when there are some; each process scores
    its share of the cells and the sums are reduced over processes.

    Args:
        noise_scheduler: the [`MaskedRankDiffusionScheduler`] (noise schedule and loss weight).
        eval_collator: collator of held-out rows (the evaluation selection rule).
        baseline: the per-gene marginal fitted on the training split.
        eval_time_grid, eval_mask_ratio: see [`evaluate_masked_diffusion`].
        ordinal_term, ordinal_weight, ordinal_time_weighting: the ordinal term (`"none"`: plain MDLM).
        ema_decay: keep an EMA of the weights with this decay ([`EMACallback`], saved with every checkpoint and
            restored on resume) and evaluate with it; None or 0: no EMA.
        reference: the [`ReferenceCells`] a model with `config.reference_context` reads: each cell's nearest
            reference cells on its visible (unmasked) positions, never itself (`reference_self` of the batch).
        reference_dropout: share of training cells shown without references (drawn per step, seeded).
        group_batches_by: a column of a streamed training set (a condition such as `cell_line_id`) and the number of
            its values: blocks of `BATCHES_PER_GROUP` x that many batches are sorted by it before they are cut
            ([`sorted_into_batches`]), so most batches hold the cells of one line under several of its conditions.
            None: batches as the stream comes.
        All other arguments go to [`~transformers.Trainer`].
    """

    def __init__(
        self,
        *args,
        noise_scheduler: MaskedRankDiffusionScheduler,
        eval_collator=None,
        baseline: PerGeneMarginal | None = None,
        eval_time_grid: int = 8,
        eval_mask_ratio: float = 0.5,
        ordinal_term: str = "rps",
        ordinal_weight: float = 1.0,
        ordinal_time_weighting: str = "nelbo",
        ema_decay: float | None = None,
        reference: ReferenceCells | None = None,
        reference_dropout: float = 0.0,
        group_batches_by: tuple[str, int] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if bool(self.model.config.reference_context) != (reference is not None):
            raise ValueError("a model with config.reference_context trains with a reference, and only such a model")
        self.reference = None if reference is None else reference.to(self.args.device)
        self.reference_dropout = reference_dropout
        self.group_batches_by = group_batches_by
        if group_batches_by is not None and not self._streamed_per_process():
            raise ValueError("--group_batches_by sorts a stream's blocks of cells: this training set is not a stream "
                             "of at least one shard per process")  # fmt: skip
        ema_decay = ema_decay_for(ema_decay or 0.0, fsdp=self.is_fsdp_enabled)
        self.ema = EMACallback(ema_decay) if ema_decay else None
        if self.ema is not None:
            self.add_callback(self.ema)
        self.add_callback(DivergenceCallback())
        self.add_callback(CheckpointCompleteCallback())  # last: after every file of a checkpoint is written
        noise_scheduler.check_model_config(self.model.config)
        self.noise_scheduler = noise_scheduler
        self.eval_collator = eval_collator
        self.baseline = baseline
        self.eval_time_grid = eval_time_grid
        self.eval_mask_ratio = eval_mask_ratio
        self.ordinal = (ordinal_term, ordinal_weight, ordinal_time_weighting)
        self._loss_parts = {"nelbo": 0.0, "ordinal": 0.0}
        self._loss_parts_calls = 0  # compute_loss calls since the last log (micro-batches)
        self._strata_step, self._micro_batch = -1, 0  # where the training times are in the global batch
        # compute_loss divides by `num_items_in_batch` (real tokens over the accumulated batch), so the Trainer
        # must count them and not divide again by the accumulation steps.
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        original, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        real = attention_mask.bool()
        timesteps = self._global_strata_timesteps(original.shape[0], original.device)
        noisy = self.noise_scheduler.add_noise(original, timesteps, maskable=real)
        outputs = model(
            gene_ids=inputs["gene_ids"],
            input_ids=noisy,
            attention_mask=attention_mask,
            timesteps=timesteps,
            **condition_inputs(inputs, original.device),
            **self._reference_inputs(inputs, noisy),
        )
        masked = noisy == self.noise_scheduler.config.mask_token_id
        count = num_items_in_batch if num_items_in_batch is not None else real.sum()
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # The count is the global one and DDP averages gradients over processes: scale back up, so the mean
            # over processes (of gradients, and of the logged loss and parts) is the global per-token loss.
            count = count / self.accelerator.num_processes
        nelbo = masked_nelbo(outputs.logits, original, masked, timesteps, self.noise_scheduler) / count
        loss = nelbo
        kind, weight, time_weighting = self.ordinal
        if kind != "none" and weight > 0:
            ordinal = masked_ordinal(
                outputs.logits, original, masked, timesteps, self.noise_scheduler, kind, time_weighting
            )
            loss = loss + weight * ordinal / count
            self._loss_parts["ordinal"] += (ordinal / count).detach()
        self._loss_parts["nelbo"] += nelbo.detach()  # kept on the device: no sync per micro-batch
        self._loss_parts_calls += 1
        return (loss, outputs) if return_outputs else loss

    def _reference_inputs(self, inputs: dict, noisy: torch.Tensor) -> dict:
        """`reference_tokens` of the training cells as masked (none without a reference): their nearest reference
        cells on their visible positions (of their group, `reference_group`, for a grouped reference), never
        themselves; `reference_dropout` of the cells get none (draws seeded by the seed, the step and the
        micro-batch)."""
        if self.reference is None:
            return {}
        mask_id = self.noise_scheduler.config.mask_token_id
        key = [self.args.seed, self.state.global_step, self._micro_batch, self.args.process_index]
        # Two streams: the reference dropout's (as before grouped references), and a grouped reference's draws.
        dropout, draws = (torch.Generator().manual_seed(int(np.random.SeedSequence(k).generate_state(1)[0]))
                          for k in (key, [*key, 1]))  # fmt: skip
        tokens = self.reference.context(
            inputs["gene_ids"], noisy, inputs["attention_mask"], mask_token_id=mask_id,
            exclude=inputs.get("reference_self"), groups=inputs.get("reference_group"), generator=draws,
        ).to(noisy.device)  # fmt: skip
        if self.reference_dropout > 0:
            dropped = torch.rand(len(tokens), generator=dropout) < self.reference_dropout
            tokens = tokens.masked_fill(dropped.to(tokens.device)[:, None, None], -1)
        return {"reference_tokens": tokens.long()}

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """[`~transformers.Trainer.train`]; `resume_from_checkpoint=True` takes the last *complete* checkpoint of
        the output folder (a partial one, left by a killed run, is never used), and the EMA weights are restored
        with the rest."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint to resume from in {self.args.output_dir}")
        if resume_from_checkpoint:
            check_resumable(resume_from_checkpoint, self.model.config, self.args.max_steps)
        if resume_from_checkpoint and self.ema is not None:
            self.ema.load(resume_from_checkpoint, self.model)
        return super().train(resume_from_checkpoint=resume_from_checkpoint or None, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        """A streamed training set is batched by `datasets` (numpy arrays, one batch at a time, not one Python row
        per cell), its shard order shuffled per epoch (seeded; `set_epoch` reaches it), and the collator takes each
        batch whole; with several processes, accelerate gives each its own shards. A map-style one, or a stream of
        fewer shards than processes, as the Trainer does it. With `group_batches_by`, blocks of batches are sorted by
        that column before they are cut (a stream only)."""
        if not self._streamed_per_process():
            # Too few shards for one per process: accelerate gives each process its share of every global batch.
            return super().get_train_dataloader()
        size = self._train_batch_size
        rows = self.train_dataset.with_format("numpy")
        if self.group_batches_by is None:
            batches = rows.batch(size)
        else:
            column, values = self.group_batches_by
            cut = functools.partial(sorted_into_batches, column=column, batch_size=size, seed=self.args.seed)
            block = size * BATCHES_PER_GROUP * values
            batches = rows.batch(block).map(cut, with_indices=True, batched=True, batch_size=1)
        batches = batches.shuffle(seed=self.args.seed, buffer_size=1)  # shard order only: a buffer of one batch
        return self._get_dataloader(batches, description="Training", batch_size=None, is_training=True)

    def _streamed_per_process(self) -> bool:
        """Whether the training set is a stream with at least one shard per process (batched by `datasets`)."""
        stream = isinstance(self.train_dataset, datasets.IterableDataset)
        return stream and self.train_dataset.n_shards >= self.args.world_size

    def _save_checkpoint(self, model, trial) -> None:
        # The Trainer deletes old checkpoints at the end of this call, before the callbacks have written their files
        # and the completeness marker: `CheckpointCompleteCallback` deletes them once the new one is complete.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit

    def _global_strata_timesteps(self, batch_size: int, device) -> torch.Tensor:
        """Training times stratified over the global batch (every process and accumulation step of one optimizer
        step): one uniform per step from a generator seeded by (seed, step), the same on every process and again
        after a resume; this micro-batch takes its own run of strata."""
        step = self.state.global_step
        if self._strata_step != step:
            self._strata_step, self._micro_batch = step, 0
        args = self.args
        per_device = max(args.per_device_train_batch_size, batch_size)
        part = self._micro_batch * args.world_size + args.process_index
        self._micro_batch = (self._micro_batch + 1) % args.gradient_accumulation_steps
        seed = int(np.random.SeedSequence([args.seed, step]).generate_state(1)[0])
        return self.noise_scheduler.sample_timesteps(
            batch_size,
            generator=torch.Generator().manual_seed(seed),
            device=device,
            first_stratum=part * per_device,
            num_strata=args.gradient_accumulation_steps * args.world_size * per_device,
        )

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the mean NELBO (and ordinal term) per optimizer step since the last log to the training logs."""
        if "loss" in logs and self._loss_parts_calls:
            # Each micro-batch's part is already divided by the accumulated batch's tokens: a step sums them.
            steps = max(self._loss_parts_calls / self.args.gradient_accumulation_steps, 1.0)
            parts = [float(value) / steps for value in self._loss_parts.values()]
            parts = torch.tensor(parts, device=self.args.device)
            if self.accelerator.num_processes > 1:  # every process logs here together; `loss` is averaged the same way
                parts = self.accelerator.reduce(parts, reduction="mean")
            nelbo, ordinal = parts.tolist()
            logs["nelbo"] = round(nelbo, 4)
            if self.ordinal[0] != "none" and self.ordinal[1] > 0:
                logs["ordinal"] = round(ordinal, 4)
            self._loss_parts = dict.fromkeys(self._loss_parts, 0.0)
            self._loss_parts_calls = 0
        super().log(logs, *args, **kwargs)

    def _sum_over_processes(self, totals: torch.Tensor) -> torch.Tensor:
        if self.accelerator.num_processes == 1:
            return totals
        return self.accelerator.reduce(totals.to(self.args.device), reduction="sum").cpu()

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        """This process's share of the held-out cells (its global rank's, over every node), batched by the
        evaluation collator."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluation needs an eval_dataset")
        return DataLoader(
            shard_for_process(dataset, self.args.process_index, self.args.world_size),
            batch_size=self.args.per_device_eval_batch_size,
            collate_fn=self.eval_collator,
            num_workers=self.args.dataloader_num_workers,
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if self.baseline is None:
            raise ValueError("evaluation needs a fitted baseline")
        batches = self.get_eval_dataloader(eval_dataset)
        with self.ema.averaged_weights(self.model) if self.ema is not None else contextlib.nullcontext():
            scores = evaluate_masked_diffusion(
                self.model,
                self.noise_scheduler,
                batches,
                self.baseline,
                time_grid=self.eval_time_grid,
                mask_ratio=self.eval_mask_ratio,
                seed=self.args.seed,
                device=self.args.device,
                reduce=self._sum_over_processes,
                reference=self.reference,
            )
        scores["loss"] = scores["nelbo"]  # what `metric_for_best_model="loss"` and plateau schedulers read
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in scores.items()}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
