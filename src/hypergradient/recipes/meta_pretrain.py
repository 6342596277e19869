r"""``hypergradient meta-pretrain``: learn multitask pre-training weights by meta-learning.

Raghu, Lorraine, Kornblith, McDermott & Duvenaud (2021) at CPU scale, on
:func:`~hypergradient.pretrain.synthetic_multitask`: 20 binary pre-training tasks on a
shared tanh encoder, of which 10 share the downstream task's latent structure and 10 are
random labels; the downstream task is 3-class with 100 labelled examples.  The pre-training
loss weights every task,

.. math::

    L_{PT}(\theta, \lambda) = \tfrac1T \textstyle\sum_t \omega_t(\lambda)\,\ell_t(\theta)
        + \tfrac\rho2 \|W\|^2, \qquad \omega = T\,\mathrm{softmax}(\lambda)
        \quad (\text{:class:`~hypergradient.hparams.TaskWeights`}),

and :class:`~hypergradient.pretrain.MetaPretrainer` runs Algorithm 1: Adam on
:math:`L_{PT}`, and every ``period`` steps (after ``warmup``) a hyper-step of Adam on
:math:`\lambda` with :func:`~hypergradient.pretrain.pretrain_hypergrad`: reverse-mode through
``finetune_steps`` SGD steps of fine-tuning from a fresh (zero) head, then implicit
differentiation through pre-training (by default the identity approximation
:math:`H^{-1} \approx \alpha I`, which Raghu et al.'s one Neumann term with the learning
rate as step equals to 3 digits; ``solver=cg relative_damping=0.1`` is the curvature-damped
implicit step, see ``benchmarks/meta_pretrain.py``).  The hypergradient's validation loss is the
downstream validation split's cross-entropy after those fine-tuning steps.

Two references are pre-trained with the same steps and fixed weights: *uniform* (every
weight 1) and *useful tasks only* (noise weights 0: what an oracle that knows which tasks
are noise would do); a *random encoder* (no pre-training) sets the floor.  Reported for
each: downstream test accuracy after linear fine-tuning (a fitted linear head on the frozen
encoder) and after full fine-tuning (encoder and head, from that head), and the learned
task weights (mean over the noise tasks / mean over the useful ones).

Files in the run folder: ``results.json``, ``meta_pretrain.png`` (task weights over the
hyper-steps, useful vs noise; downstream accuracy during pre-training, learned vs uniform vs
useful-only), ``checkpoint.pt`` (trainer state, history, finished references; written
atomically after every hyper-step) and ``checkpoint_options.json``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.table import Table

from .._errors import ConvergenceError, HypergradientError
from ..hparams import TaskWeights
from ..pretrain import (
    MetaPretrainer,
    MultitaskMLP,
    downstream_scores,
    linear_probe,
    synthetic_multitask,
)
from ..pretrain.synthetic import accuracy
from ._base import (
    ThreadedRecipe,
    load_checkpoint,
    machine,
    progress_bar,
    pyplot,
    register_recipe,
    resume_or_start_over,
    save_atomic,
    write_results,
)
from ._config import check_choice, check_positive, check_positive_int, help_text, threads_field

_SOLVERS = ("neumann", "cg", "identity", "exact", "minres")


@dataclass
class MetaPretrainConfig:
    """Options of ``hypergradient meta-pretrain`` (defaults: well under a minute on 2 busy
    CPU cores)."""

    num_useful: int = field(
        default=10, metadata=help_text("pre-training tasks that share the downstream structure")
    )
    num_noise: int = field(
        default=10, metadata=help_text("pre-training tasks with random labels (pure noise)")
    )
    dim: int = field(default=30, metadata=help_text("input dimension"))
    latent_dim: int = field(
        default=2,
        metadata=help_text("dimension of the latent structure every useful task and the "
                           "downstream task read"),
    )  # fmt: skip
    num_classes: int = field(default=3, metadata=help_text("downstream classes"))
    n_pretrain: int = field(
        default=100, metadata=help_text("pre-training examples (labelled for every task)")
    )
    n_train: int = field(default=100, metadata=help_text("downstream fine-tuning examples"))
    n_val: int = field(
        default=100,
        metadata=help_text("downstream validation examples (the hypergradient's loss)"),
    )
    n_test: int = field(
        default=2000, metadata=help_text("downstream test examples (the reported accuracy)")
    )
    hidden: int = field(default=8, metadata=help_text("encoder width (tanh units)"))
    pretrain_steps: int = field(
        default=2000, metadata=help_text("Adam steps of every pre-training run")
    )
    pretrain_lr: float = field(default=0.01, metadata=help_text("Adam learning rate"))
    weight_decay: float = field(
        default=1e-4, metadata=help_text("L2 penalty on the weight matrices in pre-training")
    )
    batch_size: int = field(
        default=0, metadata=help_text("pre-training mini-batch size; 0: full batch")
    )
    period: int = field(default=10, metadata=help_text("pre-training steps per hyper-step (P)"))
    warmup: int = field(
        default=100, metadata=help_text("pre-training steps before the first hyper-step")
    )
    hyper_lr: float = field(
        default=0.1, metadata=help_text("Adam learning rate on the task-weight logits")
    )
    finetune: str = field(
        default="head",
        metadata=help_text("what the unrolled fine-tuning trains: 'head' (the encoder stays "
                           "frozen) or 'full' (encoder and head)"),
    )  # fmt: skip
    finetune_steps: int = field(
        default=1, metadata=help_text("fine-tuning SGD steps differentiated through (K)")
    )
    finetune_lr: float = field(
        default=1.0, metadata=help_text("SGD learning rate of the unrolled fine-tuning")
    )
    solver: str = field(
        default="identity",
        metadata=help_text("implicit solve through pre-training: neumann, cg, identity, exact "
                           "or minres"),
    )  # fmt: skip
    max_steps: int = field(default=20, metadata=help_text("solver iterations (Neumann: terms)"))
    damping: float = field(
        default=0.0, metadata=help_text("added to the pre-training Hessian (absolute)")
    )
    relative_damping: float = field(
        default=0.0,
        metadata=help_text("damping as a fraction of the pre-training Hessian's largest "
                           "eigenvalue (power iteration; also sets the Neumann step); 0: off"),
    )  # fmt: skip
    eval_every: int = field(
        default=20,
        metadata=help_text("hyper-steps between two downstream evaluations for the plot"),
    )
    full_finetune_steps: int = field(
        default=100,
        metadata=help_text("SGD-momentum steps of the final full fine-tuning; 0: skip it"),
    )
    full_finetune_lr: float = field(
        default=0.1, metadata=help_text("learning rate of the final full fine-tuning")
    )
    seed: int = field(default=0, metadata=help_text("problem, initial weights and batches"))
    threads: int = threads_field()

    @property
    def num_tasks(self) -> int:
        return self.num_useful + self.num_noise

    def validate(self) -> None:
        check_positive_int("num_useful", self.num_useful)
        check_positive_int("num_noise", self.num_noise)
        check_positive_int("dim", self.dim)
        check_positive_int("latent_dim", self.latent_dim)
        if self.latent_dim > self.dim:
            raise HypergradientError(
                f"option 'latent_dim': the latent structure lives in the input, so "
                f"latent_dim must be <= dim={self.dim}, got {self.latent_dim!r}."
            )
        check_positive_int("num_classes", self.num_classes, minimum=2)
        check_positive_int("n_pretrain", self.n_pretrain)
        check_positive_int("n_train", self.n_train)
        check_positive_int("n_val", self.n_val)
        check_positive_int("n_test", self.n_test)
        check_positive_int("hidden", self.hidden)
        check_positive_int("pretrain_steps", self.pretrain_steps)
        check_positive("pretrain_lr", self.pretrain_lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive_int("batch_size", self.batch_size, minimum=0)
        if self.batch_size > self.n_pretrain:
            raise HypergradientError(
                f"option 'batch_size': expected 0 (full batch) or at most n_pretrain="
                f"{self.n_pretrain}, got {self.batch_size!r}."
            )
        check_positive_int("period", self.period)
        check_positive_int("warmup", self.warmup, minimum=0)
        if self.warmup + self.period > self.pretrain_steps:
            raise HypergradientError(
                f"option 'warmup': warmup + period = {self.warmup + self.period} exceeds "
                f"pretrain_steps={self.pretrain_steps}, so no hyper-step would be taken; "
                f"lower warmup or raise pretrain_steps."
            )
        check_positive("hyper_lr", self.hyper_lr)
        check_choice("finetune", self.finetune, ("head", "full"))
        check_positive_int("finetune_steps", self.finetune_steps)
        check_positive("finetune_lr", self.finetune_lr)
        check_choice("solver", self.solver, _SOLVERS)
        check_positive_int("max_steps", self.max_steps, minimum=1)
        check_positive("damping", self.damping, allow_zero=True)
        check_positive("relative_damping", self.relative_damping, allow_zero=True)
        if self.damping > 0 and self.relative_damping > 0:
            raise HypergradientError(
                f"option 'relative_damping': damping={self.damping} is set too; use one "
                f"(damping absolute, relative_damping a fraction of lambda_max)."
            )
        check_positive_int("eval_every", self.eval_every)
        check_positive_int("full_finetune_steps", self.full_finetune_steps, minimum=0)
        check_positive("full_finetune_lr", self.full_finetune_lr)
        check_positive_int("seed", self.seed, minimum=0)
        check_positive_int("threads", self.threads, minimum=0)


# Options a checkpoint must agree on to be resumed (pretrain_steps may grow; threads and the
# final evaluation do not change the run).
_RESUME_EXEMPT = ("pretrain_steps", "threads", "full_finetune_steps", "full_finetune_lr")


# ----------------------------------------------------------------------------- the problem


class Problem:
    """Data, model, losses and trainers of one configuration."""

    def __init__(self, config: MetaPretrainConfig):
        self.config = config
        self.data = synthetic_multitask(
            num_useful=config.num_useful,
            num_noise=config.num_noise,
            dim=config.dim,
            latent_dim=config.latent_dim,
            num_classes=config.num_classes,
            n_pretrain=config.n_pretrain,
            n_train=config.n_train,
            n_val=config.n_val,
            n_test=config.n_test,
            seed=config.seed,
        )
        self.model = MultitaskMLP(config.dim, config.hidden, config.num_tasks, config.num_classes)
        self.kind = TaskWeights(config.num_tasks)
        self._loss = self.model.pretrain_loss(self.kind, config.weight_decay)
        self.init = self.model.init(seed=config.seed + 1)

    # the pre-training batch of step s: a function of s alone, so a resumed run sees the same
    def batch(self, step: int) -> torch.Tensor | None:
        c = self.config
        if c.batch_size == 0:
            return None
        gen = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        return torch.randperm(c.n_pretrain, generator=gen)[: c.batch_size]

    def pretrain_loss(self, params, hparams, batch) -> torch.Tensor:
        x, y = self.data.x_pretrain, self.data.y_pretrain
        if batch is not None:
            x, y = x[batch], y[batch]
        return self._loss(params, hparams, x, y)

    def finetune_loss(self, phi, theta) -> torch.Tensor:
        encoder = phi if self.config.finetune == "full" else theta
        return F.cross_entropy(
            self.model.logits(phi, encoder, self.data.x_train), self.data.y_train
        )

    def finetune_val_loss(self, phi, theta) -> torch.Tensor:
        encoder = phi if self.config.finetune == "full" else theta
        return F.cross_entropy(self.model.logits(phi, encoder, self.data.x_val), self.data.y_val)

    def finetune_init(self, theta):
        head = self.model.fresh_head()
        if self.config.finetune == "head":
            return head
        return {**{k: theta[k] for k in MultitaskMLP.ENCODER}, **head}

    def trainer(self, task_logits: torch.Tensor | None = None) -> MetaPretrainer:
        c = self.config
        hparams = self.kind.init(self.init)
        if task_logits is not None:
            hparams["task_logits"] = task_logits.clone()
        init = self.finetune_init if c.finetune == "full" else self.model.fresh_head()
        return MetaPretrainer(
            self.pretrain_loss,
            self.finetune_loss,
            self.finetune_val_loss,
            self.init,
            hparams,
            init,
            optimizer=lambda ps: torch.optim.Adam(ps, lr=c.pretrain_lr),
            hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=c.hyper_lr),
            batches=self.batch,
            period=c.period,
            warmup=c.warmup,
            finetune_steps=c.finetune_steps,
            finetune_lr=c.finetune_lr,
            solver=c.solver,
            max_steps=c.max_steps,
            tol=0.0,
            damping=c.damping,
            relative_damping=c.relative_damping if c.relative_damping > 0 else None,
        )

    def weights(self, hparams) -> list[float]:
        return self.kind.weights(hparams).tolist()

    def weight_summary(self, weights: list[float]) -> dict[str, float]:
        w = torch.tensor(weights, dtype=torch.float64)
        useful, noise = float(w[self.data.useful].mean()), float(w[~self.data.useful].mean())
        return {"useful_weight": useful, "noise_weight": noise, "weight_ratio": noise / useful}

    def linear_accuracy(self, params) -> float:
        head = linear_probe(self.model, params, self.data)
        return accuracy(self.model, head, params, self.data.x_test, self.data.y_test)

    def scores(self, params) -> dict[str, float]:
        c = self.config
        return downstream_scores(
            self.model,
            params,
            self.data,
            full_steps=c.full_finetune_steps,
            full_lr=c.full_finetune_lr,
        )

    def eval_due(self, step: int) -> bool:
        """Downstream evaluations for the curves: every ``eval_every`` hyper-steps' worth of
        pre-training steps and at the last step, the same steps for every run."""
        c = self.config
        stride = c.period * c.eval_every
        return step == c.pretrain_steps or (step > c.warmup and (step - c.warmup) % stride == 0)


# ----------------------------------------------------------------------------- the recipe


@register_recipe
class MetaPretrainRecipe(ThreadedRecipe):
    """Per-task loss weights of multitask pre-training learned by meta-learning (Raghu et
    al. 2021): the hypergradient of the downstream validation loss after fine-tuning flows
    back through unrolled fine-tuning and, by implicit differentiation, through
    pre-training. On a synthetic problem where half the pre-training tasks are random
    labels, compares the learned weights with uniform ones and with the useful tasks alone.

    Writes config.toml, results.json, meta_pretrain.png and checkpoint.pt (every hyper-step)
    into the run folder; --resume continues a killed run from its checkpoint.
    """

    name = "meta-pretrain"
    help = "learn multitask pre-training task weights by meta-learning (Raghu et al. 2021)"
    config_cls = MetaPretrainConfig

    def _run(self, config, run_dir, *, resume, progress, console):
        run_dir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        c = config
        problem = Problem(c)
        checkpoint = run_dir / "checkpoint.pt"
        meta = {"recipe": self.name} | {
            k: v for k, v in asdict(c).items() if k not in _RESUME_EXEMPT
        }
        trainer = problem.trainer()
        history: list[dict] = []
        curves: list[dict] = []
        references: dict[str, dict] = {}
        if resume_or_start_over(run_dir, meta, resume=resume):
            state = load_checkpoint(checkpoint, "--resume", signature=meta)
            trainer.load_state_dict(state["trainer"])
            history, curves = list(state["history"]), list(state["curves"])
            references = dict(state["references"])
        elif resume:
            console.print(f"no checkpoint in {run_dir}: starting from the beginning")

        def save():
            save_atomic(
                {
                    "trainer": trainer.state_dict(),
                    "history": history,
                    "curves": curves,
                    "references": references,
                },
                checkpoint,
                signature=meta,
            )

        fixed = {
            "uniform": torch.zeros(c.num_tasks, dtype=torch.float64),
            # noise logits so low that softmax gives them weight 0 (to double precision)
            "useful_only": torch.where(problem.data.useful, 0.0, -1000.0).to(torch.float64),
        }
        with progress_bar(console, progress) as bar:
            for name, logits in fixed.items():
                done = references.get(name)
                if done is not None and done["steps"] == c.pretrain_steps:
                    continue
                task = bar.add_task(f"pre-training, {name} weights", total=c.pretrain_steps)
                references[name] = self._reference(problem, logits, bar, task)
                save()

            task = bar.add_task(
                f"meta-pre-training (hyper-step every {c.period} steps)",
                total=c.pretrain_steps,
                completed=trainer.step_count,
            )

            def on_hyper_step(tr: MetaPretrainer, info) -> None:
                weights = problem.weights(tr.hparams)
                val_loss = float(info.val_loss)
                if not math.isfinite(val_loss):
                    raise HypergradientError(
                        f"meta-pretrain: the fine-tuned validation loss became {val_loss} at "
                        f"pre-training step {tr.step_count}; lower option 'finetune_lr' (now "
                        f"{c.finetune_lr}) or 'hyper_lr' (now {c.hyper_lr})."
                    )
                history.append(
                    {
                        "hyper_step": tr.hyper_step_count,
                        "step": tr.step_count,
                        "finetune_val_loss": val_loss,  # before this hyper-step's update
                        "hypergrad_norm": float(info.hypergrad["task_logits"].norm()),
                        "task_weights": weights,
                        **problem.weight_summary(weights),
                    }
                )
                if problem.eval_due(tr.step_count):
                    curves.append(
                        {"step": tr.step_count, "linear_acc": problem.linear_accuracy(tr.params)}
                    )
                save()
                bar.update(task, completed=tr.step_count)

            try:
                trainer.run(c.pretrain_steps, callback=on_hyper_step)
            except ConvergenceError as err:
                raise HypergradientError(
                    f"meta-pretrain: the implicit solve failed at pre-training step "
                    f"{trainer.step_count} ({err}); use option solver='minres', "
                    f"'relative_damping' (e.g. 0.1; now {c.relative_damping}), or "
                    f"solver='identity'."
                ) from None
            bar.update(task, completed=trainer.step_count)

        learned_weights = problem.weights(trainer.hparams)
        runs = {
            "learned": {
                **problem.scores(trainer.params),
                **problem.weight_summary(learned_weights),
                "task_weights": learned_weights,
                "curve": curves,
            },
            **{
                name: {
                    **problem.scores(references[name]["params"]),
                    **problem.weight_summary(references[name]["task_weights"]),
                    "task_weights": references[name]["task_weights"],
                    "curve": references[name]["curve"],
                }
                for name in fixed
            },
            "random_encoder": problem.scores(problem.init),
        }
        results = {
            "recipe": self.name,
            "config": asdict(c),
            "machine": machine(),
            "useful_tasks": problem.data.useful.tolist(),
            "runs": runs,
            "gain_over_uniform": {
                key: runs["learned"][key] - runs["uniform"][key]
                for key in ("linear_acc", "full_acc")
                if key in runs["learned"]
            },
            "seconds": time.perf_counter() - start,
            "history": history,
        }
        write_results(run_dir, results)
        plot(results, run_dir / "meta_pretrain.png")
        console.print(results_table(results))
        learned = runs["learned"]
        console.print(
            f"Learned task weights: noise tasks {learned['noise_weight']:.3f} on average, "
            f"useful tasks {learned['useful_weight']:.3f} (ratio "
            f"{learned['weight_ratio']:.3f}). Wrote results.json and meta_pretrain.png to "
            f"{run_dir}."
        )
        return results

    @staticmethod
    def _reference(problem: Problem, logits, bar, task) -> dict:
        """Plain pre-training with fixed task weights (no hyper-steps), with the same
        downstream evaluations as the meta-learned run."""
        trainer = problem.trainer(logits)
        curve = []
        for _ in range(problem.config.pretrain_steps):
            trainer.pretrain_step()
            if problem.eval_due(trainer.step_count):
                curve.append(
                    {
                        "step": trainer.step_count,
                        "linear_acc": problem.linear_accuracy(trainer.params),
                    }
                )
            bar.update(task, completed=trainer.step_count)
        return {
            "steps": trainer.step_count,
            "params": trainer.params,
            "task_weights": problem.weights(trainer.hparams),
            "curve": curve,
        }


_LABELS = {
    "learned": "meta-learned weights",
    "uniform": "uniform weights",
    "useful_only": "useful tasks only (oracle)",
    "random_encoder": "no pre-training (random encoder)",
}


def results_table(results: dict) -> Table:
    c = results["config"]
    table = Table(
        title=f"Meta-pre-training: {c['num_useful']} useful + {c['num_noise']} noise tasks, "
        f"{c['pretrain_steps']} Adam steps, downstream {c['num_classes']}-class on "
        f"{c['n_train']} examples (test accuracy)"
    )
    for col in ("pre-training", "noise/useful weight", "linear FT", "full FT"):
        table.add_column(col, justify="left" if col == "pre-training" else "right")
    for key, label in _LABELS.items():
        r = results["runs"][key]
        ratio = f"{r['weight_ratio']:.3f}" if "weight_ratio" in r else "-"
        full = f"{r['full_acc']:.3f}" if "full_acc" in r else "-"
        table.add_row(label, ratio, f"{r['linear_acc']:.3f}", full)
    return table


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    history = results["history"]
    useful = results["useful_tasks"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    steps = [r["step"] for r in history]
    if history:
        weights = list(zip(*[r["task_weights"] for r in history]))
        for t, series in enumerate(weights):
            ax.plot(steps, series, color="C0" if useful[t] else "C3", alpha=0.25, lw=0.8)
        ax.plot(steps, [r["useful_weight"] for r in history], color="C0", lw=2.5,
                label="useful tasks (mean)")  # fmt: skip
        ax.plot(steps, [r["noise_weight"] for r in history], color="C3", lw=2.5,
                label="noise tasks (mean)")  # fmt: skip
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("task weight  T softmax(lambda)")
    ax.set_title("learned task weights")
    ax.legend()
    ax = axes[1]
    runs = results["runs"]
    for key, color, style in (
        ("learned", "C0", "-"),
        ("uniform", "C1", "-"),
        ("useful_only", "gray", "--"),
    ):
        curve = runs[key]["curve"]
        ax.plot([p["step"] for p in curve], [p["linear_acc"] for p in curve], style,
                color=color, marker="o", ms=3, label=_LABELS[key])  # fmt: skip
    ax.axhline(runs["random_encoder"]["linear_acc"], color="k", ls=":", lw=1,
               label=_LABELS["random_encoder"])  # fmt: skip
    ax.set_xlabel("pre-training step")
    ax.set_ylabel("downstream test accuracy (linear FT)")
    ax.set_title("downstream accuracy during pre-training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
