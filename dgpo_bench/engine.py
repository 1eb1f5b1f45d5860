"""The run loop: rollouts -> rewards -> objective step -> meters -> evaluation -> results.

The engine owns the budget, the cost meters and the evaluation protocol; objectives
only see a ``TrainContext``. Every process runs this loop; processes own contiguous
slices of each step's global batch, so all per-sample randomness is keyed by the
global sample index and N processes reproduce one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .building import backbone_prompts, given_prompts, load_backbone, load_rewards, prompt_source
from .context import EngineContext, derive_seed, make_accelerator, sample_seeds
from .contracts import LoadContext, RolloutBatch, SampleNoise, SampleOutput
from .ema import WeightEma
from .sharding import full_tensor, like
from .errors import MissingWeightsError, SpecError
from .evaluation import EvalResult, evaluate, score_reward
from .meters import CostMeter
from .progress import ProgressReporter
from .resolve import Resolved, default_prompts_note
from .results import (METRICS_FILE, RESULT_FILE, SPEC_FILE, append_jsonl, environment, replaced_atomically, save_grid,
                      write_json)

CHECKPOINT_DIR = "checkpoint"


class Engine:
    """Runs one resolved spec into ``run_dir``; resumes from its checkpoint if present."""

    def __init__(self, resolved: Resolved, run_dir: Path, *, accelerator=None, progress: bool = True,
                 plugin_versions: dict[str, str] | None = None):
        self.r = resolved
        self.spec = resolved.spec
        self.run_dir = Path(run_dir)
        self.acc = accelerator or make_accelerator()
        self.main = self.acc.is_main_process
        self.progress = ProgressReporter(enabled=progress and self.main)
        self.plugin_versions = plugin_versions or {}
        self.meter = CostMeter()
        n_img, k, procs = self.spec.images_per_step, self.spec.updates_per_rollout, self.acc.num_processes
        if n_img % (k * procs):
            raise SpecError(f"{n_img} images per rollout (group_size x prompts_per_step) do not split evenly into "
                            f"{k} update(s) over {procs} processes; change group_size or prompts_per_step.")
        self.local = n_img // (k * procs)  # samples of one update on this process
        self.notes = list(resolved.notes)

    # ------------------------------------------------------------------ setup
    def build(self) -> None:
        """Load the rewards, backbone, samplers and objective (run() calls this; benchmarks that
        drive single rollouts call it themselves)."""
        r, spec = self.r, self.spec
        torch.manual_seed(spec.seed)
        ctx = LoadContext(device=self.acc.device, world=r.world, seed=spec.seed)
        self.reward_objs = load_rewards([(ref.name, cls, opts) for (cls, opts, _), ref in zip(r.rewards, spec.rewards)]
                                        + [(ref.name, cls, opts) for (cls, opts), ref in
                                           zip(r.eval_rewards, spec.eval.rewards)], ctx)
        self.weights = {ref.name: w for (_, _, w), ref in zip(r.rewards, spec.rewards)}
        source = prompt_source(self.reward_objs, list(self.weights))
        self._check_groupwise()
        self.eval_names = [n for n, rw in self.reward_objs.items() if not rw.groupwise]
        unfilled = [split for split in ("train", "eval") if getattr(spec.prompts, split) is None]
        if source is None and unfilled and any(type(rw).declared_at_load for rw in self.reward_objs.values()):
            self.notes.append(default_prompts_note(spec.backbone.name, unfilled))
            self.progress.log(f"[dim]{self.notes[-1]}")
        prompt_sets = {split: given_prompts(split, getattr(spec.prompts, split), source) for split in ("train", "eval")}

        self.backbone = load_backbone(*r.backbone, ctx, source)
        self.backbone.meter = self.meter
        self.train_prompts, eval_all = (backbone_prompts(self.backbone, split) if got is None else got
                                        for split, got in prompt_sets.items())
        if len(eval_all) < spec.eval.prompts:
            self.progress.log(f"[yellow]only {len(eval_all)} held-out prompts available; using all of them")
        self.eval_prompts = eval_all[: spec.eval.prompts]
        if len(self.train_prompts) < spec.prompts_per_step:
            raise SpecError(f"The training prompt set has {len(self.train_prompts)} prompts, fewer than "
                            f"prompts_per_step={spec.prompts_per_step}; add prompts or lower prompts_per_step.")
        self.sampler = r.sampler[0](r.sampler[1])
        self.eval_sampler = r.eval_sampler[0](r.eval_sampler[1])
        o_cls, o_opts = r.objective
        self.objective = o_cls(o_opts)
        self.ctx = EngineContext(self.backbone, self.sampler, self.acc, o_opts, spec.seed, spec.group_size,
                                 spec.prompts_per_step)
        self.objective.setup(self.ctx)
        self.eval_ema = WeightEma(self.backbone.trainable_parameters()) if spec.eval.ema else None

    def _check_groupwise(self) -> None:
        """Group-wise training rewards (declared, or learnt from a server at load) need whole groups."""
        spec = self.spec
        shuffled = spec.updates_per_rollout > 1 and self.r.objective[0].shuffle_updates
        if any(self.reward_objs[n].groupwise for n in self.weights) and (self.local % spec.group_size or shuffled):
            raise SpecError("Group-wise rewards need whole groups on every process (and objectives that deal a "
                            "rollout's samples at random into several updates cannot give them); make group_size x "
                            "prompts_per_step / (updates_per_rollout x processes) a multiple of group_size.")

    # ------------------------------------------------------------------ steps
    def _step_prompts(self, step: int) -> list[int]:
        """Global prompt indices of ``step``: a seeded permutation, epoch by epoch."""
        n, k = len(self.train_prompts), self.spec.prompts_per_step
        out: list[int] = []
        pos = step * k
        while len(out) < k:
            epoch, offset = divmod(pos, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.spec.seed, "epoch", epoch)))
            take = perm[offset: offset + k - len(out)].tolist()
            out += take
            pos += len(take)
        return out

    def _layout(self, r: int) -> list[list[int]]:
        """Global indices of rollout ``r``'s samples that this process trains on, one list per update.

        Update u takes positions [u n / k, (u + 1) n / k) of the rollout's order (sample order, or a
        seeded shuffle for objectives that deal samples at random), each process a contiguous
        slice of them; a sample's prompt and noise depend only on its index, so N processes
        reproduce one.
        """
        n, k, rank = self.spec.images_per_step, self.spec.updates_per_rollout, self.acc.process_index
        order = torch.arange(n)
        if k > 1 and self.objective.shuffle_updates:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.spec.seed, "split", r)))
        return [order[u * n // k + rank * self.local: u * n // k + (rank + 1) * self.local].tolist() for u in range(k)]

    def rollout(self, r: int) -> tuple[list[RolloutBatch], list[dict[str, np.ndarray]]]:
        """Sample and score this process's share of rollout ``r`` with the current weights; returns one
        batch per update and, for each, every training reward's raw scores."""
        spec, bb = self.spec, self.backbone
        g = spec.group_size
        prompt_ids = self._step_prompts(r)
        layout = self._layout(r)
        ids = [i for part in layout for i in part]
        n_local = len(ids)
        prompts = [self.train_prompts[prompt_ids[i // g]] for i in ids]
        cond = bb.encode_prompts([p.text for p in prompts])
        noise = SampleNoise(sample_seeds(spec.seed, r, ids), bb.device).randn(bb.latent_shape, bb.dtype)
        step_noise = SampleNoise(sample_seeds(spec.seed, r, ids, "sde"), bb.device)
        chunk = spec.rollout_batch_size or self.local
        outs: list[SampleOutput] = []
        bar = self.progress.task("rollout", n_local)
        with self.meter.phase("rollout"), torch.no_grad(), self.objective.rollout_weights(self.ctx):
            bb.train(False)
            for s in range(0, n_local, chunk):
                sl = slice(s, s + chunk)
                outs.append(self.sampler.sample(bb, cond.select(sl), noise[sl], step_noise=step_noise.subset(sl),
                                                trajectory=self.objective.needs_trajectory))
                self.progress.advance(bar, len(outs[-1].latents))
        self.progress.finish(bar)
        self.meter.images += spec.images_per_step
        out = SampleOutput(
            latents=torch.cat([o.latents for o in outs]), sigmas=outs[0].sigmas,
            trajectory=torch.cat([o.trajectory for o in outs]) if outs[0].trajectory is not None else None,
            log_probs=torch.cat([o.log_probs for o in outs]) if outs[0].log_probs is not None else None)
        with self.meter.phase("reward"):
            images = bb.decode(out.latents)
            raw = {name: score_reward(name, self.reward_objs[name], images, prompts, g) for name in self.weights}
            self.meter.reward_calls += spec.images_per_step * len(self.weights)
        total = torch.as_tensor(sum(self.weights[n] * raw[n] for n in self.weights), dtype=torch.float32)
        id_tensor = torch.tensor(ids)
        every_id = self.ctx.gather(id_tensor.to(self.acc.device)).cpu()
        rollout_rewards = torch.zeros(spec.images_per_step)
        rollout_rewards[every_id] = self.ctx.gather(total.to(self.acc.device)).cpu()
        rollout_group_ids = torch.arange(spec.images_per_step) // g
        batches, raws = [], []
        for u in range(len(layout)):
            sl = slice(u * self.local, (u + 1) * self.local)
            cut = (lambda t: None if t is None else t[sl])
            batches.append(RolloutBatch(
                prompts=prompts[sl], cond=cond.select(sl), noise=noise[sl], latents=out.latents[sl],
                sigmas=out.sigmas, group_ids=id_tensor[sl] // g, rewards=total[sl],
                guidance_scale=self.sampler.guidance(bb), sample_ids=id_tensor[sl], rollout_rewards=rollout_rewards,
                rollout_group_ids=rollout_group_ids, trajectory=cut(out.trajectory), log_probs=cut(out.log_probs)))
            raws.append({name: v[sl] for name, v in raw.items()})
        return batches, raws

    def _over_budget(self, step: int) -> bool:
        """Whether training stops after ``step`` optimizer steps; image and reward-call limits are
        checked only where a rollout's updates are all taken, so no rolled-out image goes untrained."""
        b, m = self.spec.budget, self.meter
        boundary = step % self.spec.updates_per_rollout == 0
        over = ((b.steps is not None and step >= b.steps)
                or (b.seconds is not None and m.train_seconds >= b.seconds)
                or (boundary and b.images is not None and m.images >= b.images)
                or (boundary and b.reward_calls is not None and m.reward_calls >= b.reward_calls))
        if self.acc.num_processes > 1:  # every process must stop at the same step
            over = bool(self.ctx.all_reduce_sum(torch.tensor([float(over)], device=self.acc.device)).item())
        return over

    def _steps_in_budget(self) -> int | None:
        """Optimizer steps the budget allows, where a step, image or reward-call limit fixes them."""
        b, per_rollout, k = self.spec.budget, self.spec.images_per_step, self.spec.updates_per_rollout
        limits = [b.steps,
                  None if b.images is None else -(-b.images // per_rollout) * k,
                  None if b.reward_calls is None else -(-b.reward_calls // (per_rollout * len(self.weights))) * k]
        known = [n for n in limits if n is not None]
        return min(known) if known else None

    def _cost(self) -> dict[str, Any]:
        snap = self.meter.snapshot()
        if self.acc.num_processes > 1:
            keys = list(snap["nfe"])
            t = torch.tensor([snap["nfe"][k] for k in keys] + [snap["eval_nfe"]], dtype=torch.float64,
                             device=self.acc.device)
            t = self.acc.reduce(t, reduction="sum").tolist()
            snap["nfe"] = {k: int(v) for k, v in zip(keys, t)}
            snap["eval_nfe"], snap["nfe_total"] = int(t[-1]), int(sum(t[:-1]))
        snap["processes"] = self.acc.num_processes
        return snap

    # ------------------------------------------------------------------ eval
    def _update_eval_ema(self, step: int) -> None:
        ema = self.spec.eval.ema
        if ema and step % ema.every == 0:
            self.eval_ema.update(self.backbone.trainable_parameters(), min(ema.decay, (1 + step) / (10 + step)))

    def _eval_weights(self) -> contextlib.AbstractContextManager:
        """The weights evaluated and exported: the slow EMA if the spec asks for one."""
        if self.eval_ema is None:
            return contextlib.nullcontext()
        return self.backbone.swapped_weights(self.eval_ema.tensors, role="ema")

    def _evaluate(self, step: int, label: str) -> EvalResult:
        with self._eval_weights():
            res = evaluate(self.backbone, self.eval_sampler, {n: self.reward_objs[n] for n in self.eval_names},
                           self.eval_prompts, self.spec.eval.seeds, self.spec.eval.batch_size, self.acc,
                           self.progress, self.spec.eval.grid, f"eval ({label})")
        if self.main:
            append_jsonl(self.run_dir / METRICS_FILE, {"type": "eval", "step": step, "label": label,
                                                       "scores": res.scores, "per_prompt": res.per_prompt,
                                                       "cost": self._cost()})
            if res.grid is not None:
                save_grid(self.run_dir / "samples" / f"{label}.png", res.grid, res.grid_prompts)
        else:
            self._cost()  # keep collectives in step across processes
        self.progress.log(f"eval {label} (step {step}): " + ", ".join(f"{k} {v:.4f}" for k, v in res.scores.items()))
        return res

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, step: int, base: EvalResult) -> None:
        """Whole tensors of the trainable weights, evaluation EMA, optimizer and objective state; every
        process gathers (a no-op unless sharded), the main one writes."""
        from safetensors.torch import save_file

        params = {f"p{i}": full_tensor(p.detach()).contiguous().cpu()
                  for i, p in enumerate(self.backbone.trainable_parameters())}
        if self.eval_ema is not None:
            params.update({f"e{i}": t.contiguous() for i, t in enumerate(self.eval_ema.state_dict())})
        state = {"optimizer": self.ctx.optimizer_state(), "objective": self.objective.state_dict()}
        if not self.main:
            return
        with replaced_atomically(self.run_dir / CHECKPOINT_DIR) as tmp:
            save_file(params, str(tmp / "trainable.safetensors"))
            torch.save(state, tmp / "state.pt")
            write_json(tmp / "engine.json", {"step": step, "cost": self.meter.snapshot(), "base": base.scores,
                                             "base_per_prompt": base.per_prompt})

    def _load_checkpoint(self) -> tuple[int, EvalResult] | None:
        ck = self.run_dir / CHECKPOINT_DIR
        if not (ck / "engine.json").is_file():
            return None
        from safetensors.torch import load_file

        try:
            params = load_file(str(ck / "trainable.safetensors"))
            with torch.serialization.safe_globals(self.ctx.checkpoint_globals()):
                state = torch.load(ck / "state.pt", weights_only=True, map_location="cpu")
            info = json.loads((ck / "engine.json").read_text())
        except Exception as exc:
            raise MissingWeightsError(f"The checkpoint in {ck} is corrupt ({type(exc).__name__}); delete that "
                                      "folder to restart the run from the beginning.") from None
        trainable = self.backbone.trainable_parameters()
        if sum(k.startswith("p") for k in params) != len(trainable) or \
                (self.eval_ema is not None) != any(k.startswith("e") for k in params):
            raise SpecError(f"The checkpoint in {ck} does not hold this run's {len(trainable)} trainable tensors "
                            "(and evaluation EMA); it belongs to another spec: use another --out.")
        with torch.no_grad():
            for i, p in enumerate(trainable):
                p.copy_(like(params[f"p{i}"], p))
        if self.eval_ema is not None:
            self.eval_ema.load_state_dict([params[f"e{i}"] for i in range(len(trainable))])
        self.ctx.load_optimizer_state(state["optimizer"])
        self.objective.load_state_dict(state["objective"])
        self.meter.restore(info["cost"])
        return info["step"], EvalResult(info["base"], info.get("base_per_prompt", {}), None, [])

    # ------------------------------------------------------------------ run
    def prepare_dir(self) -> None:
        """Create the run directory, or check that the one there holds the same spec."""
        resolved = self.r.resolved_dict()
        spec_path = self.run_dir / SPEC_FILE
        if spec_path.is_file():
            old = json.loads(spec_path.read_text())
            if old != json.loads(json.dumps(resolved)):
                raise SpecError(f"{self.run_dir} already holds a run with a different spec; pass another --out "
                                "or delete it.")
        elif self.main:
            write_json(spec_path, resolved)

    def run(self) -> dict[str, Any]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.prepare_dir()
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with self.progress:
            self.build()
            resumed = self._load_checkpoint()
            if resumed:
                step, base = resumed
                self.ctx.step = step
                self.progress.log(f"resuming {self.run_dir} at step {step}")
                if base.per_prompt and not (self.run_dir / "per_prompt.json").is_file():
                    self._write_per_prompt(base)
            else:
                step = 0
                base = self._evaluate(0, "base")
                self._write_per_prompt(base)
            total = self._steps_in_budget()
            # a seconds-only budget: the bar counts training seconds
            bar_seconds = total is None
            task = self.progress.task("train (s)" if bar_seconds else "train",
                                      self.spec.budget.seconds if bar_seconds else total)
            self.progress.update(task, completed=self.meter.train_seconds if bar_seconds else step)
            done = self._over_budget(step)
            k, pending, saved_at = self.spec.updates_per_rollout, [], step
            while not done:
                if not pending:  # a resumed run starts at a rollout boundary (checkpoints are taken there)
                    self.ctx.step = step
                    pending = list(zip(*self.rollout(step // k)))
                self._train_step(step, *pending.pop(0))
                step += 1
                self._update_eval_ema(step)
                self.progress.update(task, completed=self.meter.train_seconds if bar_seconds else step,
                                     description=f"train{' (s)' if bar_seconds else ''} "
                                                 f"(reward {self._last_reward:.3f})")
                done = self._over_budget(step)
                # the last step's evaluation is the final one, made once below
                if self.spec.eval.every and step % self.spec.eval.every == 0 and not done:
                    self._evaluate(step, f"step{step:05d}")
                every = self.spec.checkpoint_every
                if every and not pending and step // every > saved_at // every:  # rollout boundaries only
                    self._save_checkpoint(step, base)
                    saved_at = step
            self.progress.finish(task)
            final = self._evaluate(step, "final")
            with self._eval_weights():
                state = self.acc.get_state_dict(self.ctx.module)  # every process: gathered when sharded
                if self.main:  # inside the swap: unsharded, the state's tensors are the parameters themselves
                    with replaced_atomically(self.run_dir / "weights") as tmp:
                        self.backbone.save_trainable(tmp, state)
        result = {
            "status": "finished",
            "spec": self.r.resolved_dict(),
            "notes": self.notes,
            "seed": self.spec.seed,
            "steps": step,
            "train_reward": self.spec.rewards[0].name,
            "base": base.scores,
            "tuned": final.scores,
            "higher_is_better": {n: self.reward_objs[n].higher_is_better for n in self.eval_names},
            "cost": self._cost(),
            "started": started,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "environment": environment(),
            "plugins": self.plugin_versions,
            "run_dir": str(self.run_dir),
        }
        if self.main:
            self._write_per_prompt(base, final)
            write_json(self.run_dir / RESULT_FILE, result)
            shutil.rmtree(self.run_dir / CHECKPOINT_DIR, ignore_errors=True)
        for reward in self.reward_objs.values():
            reward.close()
        return result

    def _write_per_prompt(self, base: EvalResult, final: EvalResult | None = None) -> None:
        """Every held-out prompt's base score (and final score once there is one)."""
        if self.main:
            data = {"prompts": [p.text for p in self.eval_prompts], "base": base.per_prompt}
            write_json(self.run_dir / "per_prompt.json", data | ({"final": final.per_prompt} if final else {}))

    def _train_step(self, step: int, batch: RolloutBatch, raw: dict[str, np.ndarray]) -> None:
        self.ctx.step = step
        with self.meter.phase("train"):
            self.backbone.train(True)
            out = self.ctx.update(self.objective, batch)
        rewards = self.ctx.gather(batch.rewards.to(self.acc.device)).cpu()
        raw_means = {n: float(self.ctx.gather(torch.as_tensor(v, device=self.acc.device)).mean()) for n, v in raw.items()}
        self._last_reward = float(rewards.mean())
        record = {"type": "train", "step": step + 1, "reward_mean": self._last_reward,
                  "reward_std": float(rewards.std(unbiased=False)), "rewards": raw_means,
                  "metrics": out.metrics, "cost": self._cost()}
        if self.main:
            append_jsonl(self.run_dir / METRICS_FILE, record)
        if self.spec.log_samples:
            adv = self.ctx.gather(out.advantages.to(self.acc.device)).cpu().tolist() if out.advantages is not None else None
            gids = self.ctx.gather(batch.group_ids.to(self.acc.device)).cpu().tolist()
            if self.main:
                append_jsonl(self.run_dir / "rollouts.jsonl", {"step": step + 1, "group_ids": gids,
                                                               "rewards": rewards.tolist(), "advantages": adv})
