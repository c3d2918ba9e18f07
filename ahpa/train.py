"""The training loop: one loop for vanilla SiT and every alignment objective.

    batch -> transport (t, eps, x_t) -> SiT -> v -> diffusion loss --+
                                        +-> hidden at block d -> head -+-> align loss (x lambda)
                        features + t -> router -> target -------------+

Alignment is an objective beside the diffusion loss (docs/design.md section 4): with
``align.method=vanilla`` it is absent and the loop is plain SiT training.

Determinism: every random draw of step ``s`` (posterior sample, t, eps, label
dropout, flips) comes from one generator seeded by ``(seed, s)`` for the whole
global batch, and each rank takes its slice.  So N steps equal N/2 + resume +
N/2 exactly, and 2 processes give the update of 1 process with the same global
batch.  Runs resume by themselves from ``OUT/checkpoints/latest``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import time
from pathlib import Path

import torch
import yaml
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import save_image
from tqdm.auto import tqdm

from ahpa import preemption
from ahpa.build import build_backbone, build_objective, build_source, build_transport, is_text_to_image, weights_meta
from ahpa.checkpointing import latest_checkpoint, load_checkpoint, resume_from_latest, save_checkpoint
from ahpa.config import Config, load_config, save_config, to_dict
from ahpa.data.sampler import step_generator
from ahpa.distributed import ShardedLoadView, ShardedOptimizerLoadView, full_state_dict, full_views, is_sharded, shard_training_module, sync_ema
from ahpa.errors import AhpaError
from ahpa.io import RunLock, atomic_open, check_output_dir, lock_on_main_rank, remove_temps_in, write_text_atomic
from ahpa.models.repa import init_from_repa
from ahpa.nonfinite import NonFiniteGuard
from ahpa.probe.gsnr import training_gsnr
from ahpa.resume import apply_optimizer_settings, check_resume_config
from ahpa.router_plot import plot_router
from ahpa.sampling import noise_for_indices, sample
from ahpa.training_module import TrainingModule, optimizer_param_groups, rank_slice, update_ema

GRID_PER_ROW = 8  # samples per class (or caption) row of the training sample grids


def _save_grid(images: torch.Tensor, nrow: int, path: Path) -> None:
    with atomic_open(path) as f:
        save_image(images.float().clamp(-1, 1) * 0.5 + 0.5, f, format="png", nrow=nrow, padding=1)


def _releases_lock_on_error(init):
    """A Trainer whose setup fails releases its run-directory lock at once (not at garbage collection)."""
    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except BaseException:
            self.close()
            raise

    return wrapper


class Trainer:
    """Builds a run from a config and trains it; ``run()`` returns the metrics dict."""

    @_releases_lock_on_error
    def __init__(self, cfg: Config, *, show_progress: bool = True, resume: bool = True):
        from accelerate import Accelerator  # accelerate: slow to import, only a Trainer needs it

        self.cfg = cfg
        self.out = Path(cfg.train.out)
        self.show_progress = show_progress
        mp = cfg.train.mixed_precision
        if mp == "auto":
            mp = "bf16" if torch.cuda.is_available() else "no"
        # train.fsdp=true, or an accelerate FSDP config: ahpa shards the model itself (ahpa/distributed.py)
        self.fsdp = cfg.train.fsdp = cfg.train.fsdp or os.environ.pop("ACCELERATE_USE_FSDP", "false").lower() == "true"
        self.accelerator = Accelerator(mixed_precision=mp, cpu=not torch.cuda.is_available())
        acc = self.accelerator
        self.device = acc.device
        self.world, self.rank = acc.num_processes, acc.process_index
        if cfg.train.global_batch % self.world:
            raise AhpaError(f"train.global_batch={cfg.train.global_batch} does not split over {self.world} processes; use a multiple of {self.world}")
        self.per_rank = cfg.train.global_batch // self.world
        if torch.cuda.is_available() and cfg.train.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self._lock = self._lock_run_dir()  # before anything reads or writes the run directory
        if resume:  # every rank reads the file: a refusal on rank 0 alone would leave the others waiting
            check_resume_config(self.out, cfg)
        elif latest_checkpoint(self.out) is not None:
            raise AhpaError(f"{self.out} already holds checkpoints of a run; without resuming they would be mixed with the new "
                            "run's (and pruned by step number): choose a new --out directory or remove its checkpoints/")

        self.source = build_source(cfg, device=self.device, rank=self.rank, world=self.world, per_rank=self.per_rank)
        torch.manual_seed(cfg.train.seed)  # model initialisation is identical on every rank and for every source
        latent_channels, latent_size = self.source.latent_shape[0], self.source.latent_shape[1]
        self.text = is_text_to_image(cfg)  # text-to-image (Appendix C): y is the text context
        if self.text and cfg.train.gsnr_every:
            raise AhpaError("train.gsnr_every is implemented for SiT (its block and label-embedder names); set train.gsnr_every=0 for an MMDiT")
        self.sit = build_backbone(cfg, self.source.latent_shape, getattr(self.source, "context_shape", None))
        if self.text:
            self.sit.set_null_context(self.source.null_context)
        if self.source.num_classes > cfg.model.num_classes:
            raise AhpaError(f"the data has {self.source.num_classes} classes but model.num_classes={cfg.model.num_classes}; set model.num_classes={self.source.num_classes}")
        self.objective = build_objective(cfg, self.sit, self.source.group_shapes)
        self.ema = copy.deepcopy(self.sit).requires_grad_(False).eval().to(self.device)
        self.transport = build_transport(cfg)
        self.module = TrainingModule(self.sit, self.objective, self.transport)
        # FSDP shards the objective: router plots and logs read an unsharded copy (ahpa/distributed.py)
        self.plain_objective = copy.deepcopy(self.objective) if self.fsdp and self.objective is not None else None
        if self.fsdp and self.world > 1:  # before the optimizer: sharding replaces the parameters
            shard_training_module(self.module.to(self.device))
        params = optimizer_param_groups(self.module, cfg)  # router lr multiplier: its own group
        # fused AdamW on CUDA: one kernel for all parameters, step counts on the device (no host sync)
        self.optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay,
                                           fused=torch.cuda.is_available())
        if self.fsdp and self.world > 1:  # sharded, not DDP-wrapped: accelerate prepares the optimizer only
            self.prepared, self.optimizer = self.module, acc.prepare(self.optimizer)
        else:
            self.prepared, self.optimizer = acc.prepare(self.module, self.optimizer)
        self.forward = torch.compile(self.prepared) if cfg.train.compile else self.prepared
        if self.fsdp:
            sharded = sum(is_sharded(p) for p in self.module.parameters())
            acc.print(f"FSDP2: {sharded} of {len(list(self.module.parameters()))} parameter tensors sharded over {self.world} process(es)")

        self.step, self.history, self.wandb_run = 0, [], None
        context = {"context_tokens": self.sit.context_tokens, "context_dim": self.sit.context_dim} if self.text else None
        self.meta = weights_meta(cfg, (latent_channels, latent_size), (self.source.scale, self.source.shift), context=context)  # for sampling
        self._check_disk_space()
        self.resumes, nonfinite_skipped = [], 0
        if resume:
            ckpt, loaded = resume_from_latest(self.out, lambda c: load_checkpoint(
                c, ema=self.ema, **self._load_targets()), log=acc.print)
            if ckpt is not None:
                state, rng = loaded
                self.step = int(state["step"])
                nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
                self._apply_resume_overrides(state)
                self.history = state.get("history", [])
                own = rng[self.rank] if self.rank < len(rng) else rng[0]
                torch.set_rng_state(own["torch"])
                if torch.cuda.is_available() and "cuda" in own:
                    torch.cuda.set_rng_state(own["cuda"])
                acc.print(f"resumed from {ckpt} at step {self.step}")
        if cfg.train.init_from and latest_checkpoint(self.out) is None:  # a new run continuing a REPA checkpoint
            self.step, note = init_from_repa(cfg.train.init_from, sit=self.sit, ema=self.ema, objective=self.objective,
                                             optimizer=self.optimizer, module=self.module)
            if self.step >= cfg.train.steps:
                raise AhpaError(f"train.init_from is at step {self.step}, train.steps={cfg.train.steps} leaves nothing to train; set train.steps > {self.step} (the total count)")
            acc.print(note)

        self._vote = preemption.vote_reduce(self.world)
        self.guard = NonFiniteGuard(self.device, skipped=nonfinite_skipped,
                                    reduce=(lambda x: acc.reduce(x, reduction="sum")) if self.world > 1 else None)
        self.source.start(self.step)
        self.fixed_noise, self.fixed_labels, self.grid_rows = self._grid_inputs()

    # ------------------------------------------------------------------ run directory (issue 9)
    def _lock_run_dir(self) -> RunLock | None:
        """Rank 0 locks OUT exclusively; every rank learns whether it could (one collective at setup)."""
        check_output_dir(self.out, "train.out / --out")
        lock = lock_on_main_rank(self.out, "ahpa train", is_main=self.accelerator.is_main_process, world=self.world, device=self.device)
        if lock is not None:
            ckpts = sorted((self.out / "checkpoints").glob("[0-9]*")) if (self.out / "checkpoints").is_dir() else []
            for sub in (self.out, self.out / "samples", self.out / "checkpoints", *ckpts):  # temps of killed writers (.router.png.*.tmp, ...)
                if sub.is_dir():
                    remove_temps_in(sub)
        return lock

    def _check_disk_space(self) -> None:
        """One checkpoint (model + EMA + AdamW moments + objective, float32) must fit before training starts."""
        if not self.accelerator.is_main_process:
            return
        n_sit = sum(p.numel() for p in self.sit.parameters())
        n_obj = sum(p.numel() for p in self.objective.parameters()) if self.objective is not None else 0
        check_output_dir(self.out, "train.out / --out", need_bytes=4 * (4 * n_sit + 3 * n_obj))

    def _apply_resume_overrides(self, state: dict) -> None:
        """The config's optimizer settings win over those restored with the optimizer state;
        a change is printed and recorded in the checkpoints' state.json ("resumes")."""
        cfg = self.cfg.train
        changed = apply_optimizer_settings(self.optimizer, optimizer_param_groups(self.module, self.cfg), self.cfg)
        self.resumes = list(state.get("resumes", []))
        if cfg.steps < self.step:
            raise AhpaError(f"{self.out} is at step {self.step}, beyond train.steps={cfg.steps}; set train.steps >= {self.step} "
                            "to continue it, or choose a new --out directory")
        if changed:
            self.resumes.append({"step": self.step, "changed": changed})
            self.accelerator.print("resume: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
                                   + f" from step {self.step} on")

    def close(self) -> None:
        """Release the run-directory lock (run() does it when it ends)."""
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
            self._lock = None

    # ------------------------------------------------------------------ pieces
    def _grid_inputs(self):
        if self.text:  # one row per caption (its fixed text context), 8 samples each
            rows = self.source.grid_captions(10)
            self.grid_prompts = [self.source.captions[r] for r in rows]
            contexts = self.source.embed_rows(torch.tensor(rows), "cpu").repeat_interleave(GRID_PER_ROW, dim=0)
            noise = noise_for_indices(range(len(contexts)), seed=self.cfg.train.seed, shape=tuple(self.source.latent_shape), device="cpu")
            return noise, contexts, GRID_PER_ROW
        classes = min(self.source.num_classes, 10)
        per_class = GRID_PER_ROW
        labels = torch.arange(classes).repeat_interleave(per_class)
        noise = noise_for_indices(range(len(labels)), seed=self.cfg.train.seed, shape=tuple(self.source.latent_shape), device="cpu")
        return noise, labels, per_class

    @torch.no_grad()
    def save_sample_grid(self, path: Path) -> None:
        """Fixed noise and labels, EMA weights in eval mode (REPA's grid used the online model in train mode)."""
        s = self.cfg.sample
        latents = sample(
            self.ema, self.fixed_labels.to(self.device), self.fixed_noise.to(self.device),
            mode="ode", method="euler", steps=min(s.steps, self.cfg.train.grid_steps), cfg_scale=s.cfg_scale,
            guidance_interval=(s.guidance_low, s.guidance_high), path=self.cfg.transport.path,
        )
        images = self.source.decode(latents)
        _save_grid(images.cpu(), self.grid_rows, path)
        if self.text:  # the caption of each grid row, beside the grid

            write_text_atomic(path.with_suffix(".txt"), "".join(f"{p}\n" for p in self.grid_prompts))

    def _rng_states(self) -> list[dict]:
        own = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            own["cuda"] = torch.cuda.get_rng_state()
        return self.accelerator.gather_for_metrics([own], use_gather_object=True) if self.world > 1 else [own]

    def _load_targets(self) -> dict:
        if not self.fsdp:
            return {"model": self.sit, "objective": self.objective, "optimizer": self.optimizer}

        return {"model": ShardedLoadView(self.sit), "optimizer": ShardedOptimizerLoadView(self.optimizer),
                "objective": ShardedLoadView(self.objective) if self.objective is not None else None}

    def _save_sources(self) -> tuple:
        """(model, objective, optimizer) for save_checkpoint; under FSDP gathered on every rank."""
        if not self.fsdp:
            return self.sit, self.objective, self.optimizer

        sync_ema(self.ema, self.sit)
        return full_views(self.sit, self.objective, self.optimizer, self.plain_objective)

    def save(self) -> Path | None:
        model, objective, optimizer = self._save_sources()
        rng = self._rng_states()
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return None
        state = {"step": self.step, "history": self.history,  # the data position is a function of the step
                 "nonfinite_skipped": self.guard.counts()[0], "resumes": self.resumes}
        ckpt = save_checkpoint(
            self.out, self.step, model=model, ema=self.ema, objective=objective, optimizer=optimizer,
            rng_states=rng, state=state, meta=self.meta, config_yaml=yaml.safe_dump(to_dict(self.cfg), sort_keys=False),
            keep_last=self.cfg.train.keep_last,
        )
        if self.objective is not None:
            plot_router(self.plain_objective or self.objective, ckpt / "router.png")
            plot_router(self.plain_objective or self.objective, self.out / "router.png")
        self.accelerator.wait_for_everyone()
        return ckpt

    def _draws(self, step: int, batch: dict) -> tuple:
        """All random draws of one step for the global batch; this rank's slice."""
        dev = self.device  # drawn on the device: the global batch costs nothing there
        g = step_generator(self.cfg.train.seed, step, dev)
        G, C = self.cfg.train.global_batch, tuple(self.source.latent_shape)
        post_eps = rank_slice(torch.randn((G, *C), generator=g, device=dev), self.rank, self.per_rank)
        t = rank_slice(self.transport.sample_t(G, dev, generator=g), self.rank, self.per_rank)
        eps = rank_slice(torch.randn((G, *C), generator=g, device=dev), self.rank, self.per_rank)
        drop = rank_slice(torch.rand(G, generator=g, device=dev) < self.cfg.model.class_dropout, self.rank, self.per_rank)
        return self.source.sample_latent(batch, post_eps), t, eps, drop

    # ------------------------------------------------------------------ loop
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.close()

    def _run(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        writer = None
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")

            writer = SummaryWriter(str(self.out / "tb"))
            self.wandb_run = _start_wandb(cfg, self.out) if cfg.train.wandb else None
            if self.step == 0:
                (self.out / "samples").mkdir(exist_ok=True)
                self.save_sample_grid(self.out / "samples_step0.png")
        t_start = time.perf_counter()
        limit = cfg.train.max_minutes * 60 if cfg.train.max_minutes > 0 else math.inf
        bar = tqdm(total=cfg.train.steps, initial=self.step, disable=not (self.show_progress and acc.is_main_process), desc="train", dynamic_ncols=True)
        self.prepared.train()
        running = []
        stopped_early = preempted = False
        while self.step < cfg.train.steps:
            # preemption (SIGTERM/SIGUSR1): all ranks agree to stop before the next step; the one in flight finished
            if preemption.stop_vote(preemption.requested() is not None, self._vote):
                preempted = True
                break
            batch = self.source.next_batch()
            x0, t, eps, drop = self._draws(self.step, batch)
            if self.objective is not None:
                self.objective.set_step(self.step)  # align.router_warmup_steps
            with acc.autocast():
                loss, loss_diff, loss_align = self.forward(x0, batch["y"], t, eps, drop, batch.get("features"))
            acc.backward(loss)
            if acc.is_main_process:
                preemption.send_test_signal(self.step + 1)  # tests: a signal in the middle of this step
            # the total norm (a device tensor) also tells the guard whether any gradient is NaN/Inf (nonfinite.py)
            grad_norm = acc.clip_grad_norm_(self.module.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf)
            found_inf = self.guard.check(loss, grad_norm)
            self.guard.step(self.optimizer, found_inf)
            self.optimizer.zero_grad(set_to_none=True)
            update_ema(self.ema, self.sit, cfg.train.ema_decay, keep=self.guard.keep(found_inf))
            self.step += 1
            running.append(torch.stack([loss.detach(), loss_diff, loss_align]))
            bar.update(1)
            if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                self._log(running, writer, bar, time.perf_counter() - t_start)
                running = []
                self._stop_if_diverged(writer)
            if cfg.train.gsnr_every and self.step % cfg.train.gsnr_every == 0 and writer is not None and self.objective is not None:
                with acc.autocast():
                    for key, value in training_gsnr(self.module, x0, batch, self.step, cfg.train.seed).items():
                        writer.add_scalar(key, value, self.step)
            if self.fsdp and cfg.train.sample_every and self.step % cfg.train.sample_every == 0:
                sync_ema(self.ema, self.sit)  # every rank: the grid needs the whole EMA
            if acc.is_main_process and cfg.train.sample_every and self.step % cfg.train.sample_every == 0:
                self.save_sample_grid(self.out / "samples" / f"{self.step:07d}.png")
            if cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0:
                self.save()
            if self._out_of_time(time.perf_counter() - t_start > limit):
                stopped_early = True
                break
        bar.close()
        if running:
            self._log(running, writer, bar, time.perf_counter() - t_start)
        saved = latest_checkpoint(self.out)
        ckpt = saved if saved is not None and saved.name == f"{self.step:07d}" else self.save()
        if acc.is_main_process and not preempted:
            self.save_sample_grid(self.out / "samples.png")
        if writer is not None:
            writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if preempted:  # a checkpoint of the step in flight is written (a second signal only set the flag again)
            raise preemption.preempted(f"at step {self.step}; checkpoint {ckpt or latest_checkpoint(self.out)}")
        elapsed = time.perf_counter() - t_start
        return {
            "steps": self.step, "stopped_early": stopped_early, "train_seconds": elapsed,
            "checkpoint": str(ckpt) if ckpt else None, "history": self.history,
        }

    def _out_of_time(self, local: bool) -> bool:
        """One stop decision for all ranks (their clocks differ: rank 0 also writes grids and checkpoints)."""
        if self.world == 1:
            return local
        if self.step % self.cfg.train.log_every:  # agree at log steps only: no extra sync per step
            return False
        flag = torch.tensor(float(local), device=self.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _stop_if_diverged(self, writer) -> None:
        """Too many consecutive non-finite steps: stop without saving (every rank reads the same counter)."""
        skipped, streak = self.guard.counts()
        limit = self.cfg.train.max_nonfinite_steps
        if streak >= limit:
            if writer is not None:
                writer.close()
            last = latest_checkpoint(self.out)
            raise AhpaError(
                f"the last {streak} steps (up to step {self.step}) had a non-finite loss or gradient and were skipped "
                f"({skipped} in all; train.max_nonfinite_steps={limit}): training diverged. Nothing was saved; the last "
                f"checkpoint is {last or 'none'}. Lower train.lr (a resume applies it) or check the data, then rerun"
            )

    def _log(self, running: list, writer, bar, elapsed: float) -> None:
        mean = torch.stack(running).mean(0)
        mean = self.accelerator.reduce(mean, reduction="mean") if self.world > 1 else mean
        loss, diff, align = (float(v) for v in mean)  # non-finite (skipped) steps included: a NaN here is visible
        skipped, _ = self.guard.counts()  # device counters, read where the loop syncs anyway
        record = {"step": self.step, "loss": loss, "loss_diffusion": diff, "loss_align": align, "seconds": round(elapsed, 3),
                  "nonfinite_skipped": skipped}
        self.history.append(record)
        if self.plain_objective is not None:  # FSDP: every rank gathers the router weights

            self.plain_objective.load_state_dict(full_state_dict(self.objective))
        if writer is None:
            return
        bar.set_postfix(loss=f"{loss:.4f}", align=f"{align:.4f}", **({"skipped": skipped} if skipped else {}))
        scalars = {"loss/total": loss, "loss/diffusion": diff, "train/nonfinite_skipped": skipped}
        if self.objective is not None:
            scalars["loss/align"] = align
            grid = (0.0, 0.25, 0.5, 0.75, 1.0)
            weights = (self.plain_objective or self.objective).router_weights(torch.tensor(grid, device=self.device))
            for name, values in weights.items():  # "gamma/G3": [T], "intra/G3": [T, L]
                values = torch.as_tensor(values).reshape(len(grid), -1)
                for i, t in enumerate(grid):
                    for j, v in enumerate(values[i].tolist()):
                        scalars[f"router/{name}/{j}/t={t}"] = v
        for key, value in scalars.items():
            writer.add_scalar(key, value, self.step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=self.step)


def _start_wandb(cfg: Config, out: Path):
    try:
        import wandb  # optional extra (pip install wandb)
    except ImportError:
        raise AhpaError("train.wandb=true but wandb is not installed; pip install wandb, or set train.wandb=false (TensorBoard logs are always written)") from None
    return wandb.init(project="ahpa", name=out.name, dir=str(out), config=to_dict(cfg), resume="allow")


# ---------------------------------------------------------------------- commands
def run_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.out:
        cfg.train.out = args.out
    with preemption.handlers():  # SIGTERM/SIGUSR1: finish the step, checkpoint it, exit 75
        metrics = Trainer(cfg, resume=not args.no_resume).run()
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a SiT (vanilla or with an alignment objective)")
    p.add_argument("--config", help="YAML config (e.g. configs/sit-b2-ahpa.yaml)")
    p.add_argument("--out", help="run directory (overrides train.out)")
    p.add_argument("--no-resume", action="store_true", help="do not resume from OUT/checkpoints/latest")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides; they win over the YAML file")
    p.set_defaults(func=run_train)
