"""Meta-learned pre-training (Raghu et al. 2021): which hypergradient through pre-training?

On the ``hypergradient meta-pretrain`` problem (``pretrain.synthetic_multitask``: 10 useful
and 10 noise pre-training tasks, a tanh encoder 30-8, 2,000 full-batch Adam steps, a
hyper-step every 10 steps after 100), the hypergradient of the fine-tuned validation loss
w.r.t. the task-weight logits is taken through pre-training in one of these ways:

* ``identity``: :math:`H^{-1} \\approx \\alpha I` with ``alpha`` = the pre-training learning
  rate (Raghu et al.'s one Neumann term with that ``alpha`` differs from it by
  ``alpha * lambda_max`` ~ 1e-3, so it is the same direction: row ``neumann-1 (lr)``);
* ``neumann-20``: 20 Neumann terms with the curvature step ``alpha = 1/lambda_max``
  (power iteration);
* ``cg-damped``: 20 CG steps on ``H + rho lambda_max I`` (``relative_damping=rho``), a
  system whose condition number is at most ``1 + 1/rho``;
* ``unrolled-10``: reverse mode through the last 10 Adam steps of pre-training (the steps
  since the previous hyper-step; Adam's moments at the window's start held fixed).

A. Accuracy of each hypergradient against a *converged dense reference*: at pre-training
   steps 300, 1000 and 2000 of meta-pre-training runs (seeds 0-2; the ``identity`` arm's
   trajectory), the pre-training is re-converged at the current task weights (L-BFGS, then
   Newton to a gradient norm below 1e-11; the Hessian is checked positive definite there)
   and the implicit hypergradient is taken by one dense solve: the true ``dE/dlambda`` of
   the converged pre-training (checked against a central finite difference).  Each method
   is evaluated at the warm-started weights (what the hyper-step uses) and, for the
   implicit ones, at the converged weights too (its own solver error alone): cosine and
   relative error.
B. Downstream test accuracy (linear and full fine-tuning) after meta-pre-training with
   each method, seeds 0-4, against uniform and useful-only (oracle) task weights.  Each
   method's hyper learning rate (and ``rho`` for ``cg-damped``) is chosen on two
   selection seeds (100, 101) by the downstream *validation* accuracy (linear probe); the
   test split is read once per run, at the end.

Run from the repository root::

    python benchmarks/meta_pretrain.py            # ~22 minutes on one core (load 8)
    python benchmarks/meta_pretrain.py --quick    # a smoke test: one seed, short runs

Writes ``<out>/meta_pretrain.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.func import grad, hessian

import hypergradient as hg
from hypergradient.diffopt import adam, apply_updates
from hypergradient.diffopt.alias import AdamState
from hypergradient.pretrain import MetaPretrainer, linear_probe, pretrain_hypergrad
from hypergradient.pretrain.synthetic import accuracy
from hypergradient.recipes.meta_pretrain import MetaPretrainConfig, Problem

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_info, rerun_command  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results"
PERIOD = 10

# name -> MetaPretrainer / pretrain_hypergrad options of the implicit step
IMPLICIT = {
    "identity": dict(solver="identity", max_steps=0),
    "neumann-1 (lr)": dict(solver="neumann", max_steps=1, alpha="lr"),
    "neumann-20": dict(solver="neumann", max_steps=20),
    "cg-damped": dict(solver="cg", max_steps=20, relative_damping=None),  # rho chosen
}
ARMS = ("identity", "neumann-20", "cg-damped", "unrolled-10")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- unrolled arm


class UnrolledPretrainer(MetaPretrainer):
    """Hyper-steps by reverse mode through the ``period`` Adam steps since the last one.

    The weights and Adam's moments at the window's start are saved; the hyper-step replays
    the window with the differentiable ``hg.diffopt.adam`` (the same update rule as
    ``torch.optim.Adam``) and back-propagates ``dE/dtheta`` (from the unrolled fine-tuning)
    into the task logits.  Adam's moments at the window's start are held fixed (truncated).
    """

    def pretrain_step(self) -> float:
        if self.step_count >= self.warmup and (self.step_count - self.warmup) % self.period == 0:
            self._window = (self.state_dict(), self.step_count)
        return super().pretrain_step()

    def hyper_step(self):
        info = pretrain_hypergrad(
            lambda p, h: self.pretrain_loss(p, h, None),
            self.finetune_loss,
            self.finetune_val_loss,
            self.params,
            self.hparams,
            self.finetune_init,
            return_info=True,
            solver="identity",
            alpha=1.0,
            stationarity_tol=None,
            finetune_steps=self.hypergrad_options["finetune_steps"],
            finetune_lr=self.hypergrad_options["finetune_lr"],
        )
        state, start = self._window
        g = unrolled_window(
            self.pretrain_loss,
            state,
            self.step_count - start,
            self.hparams,
            info.finetune_grad,
            self.optimizer.param_groups[0]["lr"],
        )
        self.hyper_optimizer.zero_grad(set_to_none=True)
        for k, v in self._hparams.items():
            v.grad = g[k]
        self.hyper_optimizer.step()
        self.hyper_step_count += 1
        return info._replace(hypergrad=g)


def unrolled_window(pretrain_loss, state, steps, hparams, v, lr) -> dict[str, torch.Tensor]:
    """``v^T d theta_end / d lambda`` through ``steps`` Adam steps from ``state``."""
    theta = {k: x.clone() for k, x in state["params"].items()}
    keys = list(theta)
    opt_state = state["optimizer"]["state"]
    tx = adam(lr=lr)
    s = AdamState(
        torch.tensor(int(opt_state[0]["step"])),
        {k: opt_state[i]["exp_avg"].clone() for i, k in enumerate(keys)},
        {k: opt_state[i]["exp_avg_sq"].clone() for i, k in enumerate(keys)},
        None,
    )
    lam = {k: x.detach().clone().requires_grad_(True) for k, x in hparams.items()}
    with torch.enable_grad():
        th = {k: x.requires_grad_(True) for k, x in theta.items()}
        for _ in range(steps):
            loss = pretrain_loss(th, lam, None)
            grads = torch.autograd.grad(loss, list(th.values()), create_graph=True)
            updates, s = tx.update(dict(zip(keys, grads)), s, th)
            th = apply_updates(th, updates)
        out = torch.autograd.grad(sum((th[k] * v[k]).sum() for k in keys), list(lam.values()))
    return {k: g.detach() for k, g in zip(lam, out)}


# ----------------------------------------------------------------------------- runs


def make_trainer(problem: Problem, arm: str, hyper_lr: float, rho: float | None):
    c = problem.config
    kwargs = dict(
        optimizer=lambda ps: torch.optim.Adam(ps, lr=c.pretrain_lr),
        hyper_optimizer=lambda ps: torch.optim.Adam(ps, lr=hyper_lr),
        period=c.period,
        warmup=c.warmup,
        finetune_steps=c.finetune_steps,
        finetune_lr=c.finetune_lr,
        tol=0.0,
    )
    if arm == "unrolled-10":
        kwargs.update(solver="identity", max_steps=0)
        cls = UnrolledPretrainer
    else:
        opts = dict(IMPLICIT[arm])
        if arm == "cg-damped":
            opts["relative_damping"] = rho
        if opts.get("alpha") == "lr":
            opts["alpha"] = c.pretrain_lr
        kwargs.update(opts)
        cls = MetaPretrainer
    hparams = problem.kind.init(problem.init)
    return cls(
        problem.pretrain_loss,
        problem.finetune_loss,
        problem.finetune_val_loss,
        problem.init,
        hparams,
        problem.model.fresh_head(),
        **kwargs,
    )


def val_accuracy(problem: Problem, params) -> float:
    head = linear_probe(problem.model, params, problem.data)
    d = problem.data
    return accuracy(problem.model, head, params, d.x_val, d.y_val)


def run_arm(seed: int, arm: str, hyper_lr: float, rho: float | None, steps: int, *, test: bool):
    problem = Problem(MetaPretrainConfig(seed=seed, pretrain_steps=steps))
    trainer = make_trainer(problem, arm, hyper_lr, rho)
    start = time.perf_counter()
    hvps = []
    try:
        trainer.run(steps, callback=lambda tr, info: hvps.append(info.stats.num_matvecs))
    except hg.ConvergenceError as err:  # a CG breakdown on an indefinite damped Hessian
        nan = float("nan")
        failed = {key: nan for key in ("hvps_per_hyper_step", "val_acc", "linear_acc",
                                       "full_acc", "weight_ratio")}  # fmt: skip
        return {"failed": str(err).split(": ")[-1][:120], "step": trainer.step_count,
                "seconds": time.perf_counter() - start, **failed}  # fmt: skip
    out = {
        "seconds": time.perf_counter() - start,
        "hvps_per_hyper_step": statistics.mean(hvps) if hvps else 0.0,
        "val_acc": val_accuracy(problem, trainer.params),
        **problem.weight_summary(problem.weights(trainer.hparams)),
    }
    if test:  # the test split, read once per reported run
        out.update(problem.scores(trainer.params))
    return out


def run_fixed(seed: int, name: str, steps: int):
    problem = Problem(MetaPretrainConfig(seed=seed, pretrain_steps=steps))
    logits = {
        "uniform": torch.zeros(problem.config.num_tasks, dtype=torch.float64),
        "useful only (oracle)": torch.where(problem.data.useful, 0.0, -1000.0).double(),
    }[name]
    trainer = problem.trainer(logits)
    for _ in range(steps):
        trainer.pretrain_step()
    return {**problem.scores(trainer.params), "val_acc": val_accuracy(problem, trainer.params)}


# ----------------------------------------------------------------------------- part A


def converge(problem: Problem, params, hparams):
    """Pre-training at fixed ``hparams`` re-converged from ``params`` (L-BFGS, Newton)."""
    keys = list(params)
    shapes = [params[k].shape for k in keys]
    sizes = [params[k].numel() for k in keys]

    def unflat(x):
        return {k: t.reshape(s) for k, t, s in zip(keys, torch.split(x, sizes), shapes)}

    def f(x):
        return problem.pretrain_loss(unflat(x), hparams, None)

    x = torch.cat([params[k].reshape(-1) for k in keys]).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], max_iter=5000, tolerance_grad=1e-12, tolerance_change=1e-20,
                            history_size=50, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = f(x)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    x = x.detach()
    for _ in range(20):
        g = grad(f)(x)
        if float(g.norm()) < 1e-12:
            break
        x = x - torch.linalg.solve(hessian(f)(x), g)
    eig = torch.linalg.eigvalsh(hessian(f)(x))
    return unflat(x), float(grad(f)(x).norm()), eig


def part_a(seeds, stops, log) -> dict:
    rows: dict[str, dict[str, list]] = {}
    points = []
    for seed in seeds:
        problem = Problem(MetaPretrainConfig(seed=seed, pretrain_steps=max(stops)))
        trainer = make_trainer(problem, "identity", 0.1, None)
        for stop in stops:
            trainer.run(stop - PERIOD)
            window = trainer.state_dict()
            trainer.run(stop)
            theta, lam = trainer.params, trainer.hparams
            theta_star, gnorm, eig = converge(problem, theta, lam)
            args = (lambda p, h, pt=problem.pretrain_loss: pt(p, h, None),
                    problem.finetune_loss, problem.finetune_val_loss)  # fmt: skip
            common = dict(finetune_steps=1, finetune_lr=problem.config.finetune_lr)
            ref = pretrain_hypergrad(*args, theta_star, lam, problem.model.fresh_head(),
                                     solver="exact", **common)["task_logits"]  # fmt: skip
            dist = float(
                sum((theta[k] - theta_star[k]).pow(2).sum() for k in theta).sqrt()
                / sum(theta_star[k].pow(2).sum() for k in theta).sqrt()
            )
            point = {"seed": seed, "step": stop, "distance_to_converged": dist,
                     "converged_grad_norm": gnorm, "converged_eig_min": float(eig[0]),
                     "converged_eig_max": float(eig[-1])}  # fmt: skip
            methods = {
                "identity": dict(solver="identity", alpha=problem.config.pretrain_lr),
                "neumann-1 (lr)": dict(
                    solver="neumann", max_steps=1, alpha=problem.config.pretrain_lr
                ),  # fmt: skip
                "neumann-20": dict(solver="neumann", max_steps=20),
                "cg-damped rho=0.1": dict(
                    solver="cg", max_steps=20, tol=0.0, relative_damping=0.1
                ),  # fmt: skip
                "cg-damped rho=0.01": dict(
                    solver="cg", max_steps=20, tol=0.0, relative_damping=0.01
                ),  # fmt: skip
                "cg-damped rho=0.001, 100 steps": dict(
                    solver="cg", max_steps=100, tol=0.0, relative_damping=0.001
                ),  # fmt: skip
                "cg (undamped), 100 steps": dict(solver="cg", max_steps=100, tol=0.0),
                "exact (undamped dense solve)": dict(solver="exact"),
            }
            info = None
            for name, kw in methods.items():
                entry = rows.setdefault(name, {"warm": [], "converged": [], "hvps": []})
                for where, at in (("warm", theta), ("converged", theta_star)):
                    try:
                        got = pretrain_hypergrad(*args, at, lam, problem.model.fresh_head(),
                                                 stationarity_tol=None, return_info=True,
                                                 **kw, **common)  # fmt: skip
                        g = got.hypergrad["task_logits"]
                        entry[where].append((cosine(g, ref), rel_error(g, ref)))
                        if where == "warm":
                            entry["hvps"].append(got.stats.num_matvecs)
                            info = got
                    except hg.ConvergenceError:
                        entry[where].append((float("nan"), float("nan")))
            for back, label in ((PERIOD, "unrolled-10"),):
                g = unrolled_window(problem.pretrain_loss, window, back, lam, info.finetune_grad,
                                    problem.config.pretrain_lr)["task_logits"]  # fmt: skip
                entry = rows.setdefault(label, {"warm": [], "converged": [], "hvps": []})
                entry["warm"].append((cosine(g, ref), rel_error(g, ref)))
                entry["hvps"].append(2 * back)
            points.append(point)
            log(f"A seed {seed} step {stop}: distance {dist:.3f}, converged |grad| {gnorm:.1e}, "
                f"eig [{eig[0]:.2e}, {eig[-1]:.2e}]")  # fmt: skip
    return {"points": points, "rows": rows}


def fd_check(seed: int, stop: int) -> dict:
    """The converged reference against a central difference along a random direction."""
    problem = Problem(MetaPretrainConfig(seed=seed, pretrain_steps=stop))
    trainer = make_trainer(problem, "identity", 0.1, None)
    trainer.run(stop)
    lam = trainer.hparams
    theta_star, _, _ = converge(problem, trainer.params, lam)
    args = (lambda p, h: problem.pretrain_loss(p, h, None), problem.finetune_loss,
            problem.finetune_val_loss)  # fmt: skip
    common = dict(finetune_steps=1, finetune_lr=problem.config.finetune_lr)
    ref = pretrain_hypergrad(*args, theta_star, lam, problem.model.fresh_head(),
                             solver="exact", **common)["task_logits"]  # fmt: skip
    direction = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed),
                            dtype=torch.float64)  # fmt: skip

    def response(t):
        h = {"task_logits": lam["task_logits"] + t * direction}
        th, _, _ = converge(problem, theta_star, h)
        return float(pretrain_hypergrad(*args, th, h, problem.model.fresh_head(),
                                        solver="identity", return_info=True,
                                        **common).val_loss)  # fmt: skip

    eps = 1e-4
    fd = (response(eps) - response(-eps)) / (2 * eps)
    analytic = float(ref @ direction)
    return {"seed": seed, "step": stop, "analytic": analytic, "finite_difference": fd,
            "relative_error": abs(analytic - fd) / abs(fd)}  # fmt: skip


# ----------------------------------------------------------------------------- part B


def part_b(args, log) -> dict:
    steps = args.steps
    grid = {arm: [(lr, None) for lr in args.hyper_lrs] for arm in ARMS}
    grid["cg-damped"] = [(lr, rho) for lr in args.hyper_lrs for rho in (0.1, 0.01)]
    selection = {}
    for arm, choices in grid.items():
        scores = []
        for lr, rho in choices:
            runs = [run_arm(s, arm, lr, rho, steps, test=False) for s in args.selection_seeds]
            mean_val = statistics.mean(r["val_acc"] for r in runs)
            mean_val = -1.0 if mean_val != mean_val else mean_val  # a failed run: never chosen
            scores.append({"hyper_lr": lr, "rho": rho, "val_acc": mean_val,
                           "seconds": statistics.mean(r["seconds"] for r in runs)})  # fmt: skip
            log(f"B select {arm} lr={lr} rho={rho}: val acc {mean_val:.4f}")
        best = max(scores, key=lambda r: r["val_acc"])
        selection[arm] = {"grid": scores, "chosen": best}
    final = {}
    for arm in ARMS:
        chosen = selection[arm]["chosen"]
        final[arm] = [run_arm(s, arm, chosen["hyper_lr"], chosen["rho"], steps, test=True)
                      for s in args.seeds]  # fmt: skip
        failed = sum("failed" in r for r in final[arm])
        log(f"B {arm}: " + ", ".join(f"{r['linear_acc']:.3f}" for r in final[arm])
            + (f" ({failed} failed)" if failed else ""))  # fmt: skip
    for name in ("uniform", "useful only (oracle)"):
        final[name] = [run_fixed(s, name, steps) for s in args.seeds]
    return {"selection": selection, "final": final}


# ----------------------------------------------------------------------------- report


def _stat(values) -> str:
    values = [v for v in values if v == v]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _median_range(values) -> str:
    ok = [v for v in values if v == v]
    failed = len(values) - len(ok)
    if not ok:
        return f"breakdown ({failed}/{len(values)})"
    text = f"{statistics.median(ok):.2f} [{min(ok):.2f}, {max(ok):.2f}]"
    return text + (f", {failed} breakdowns" if failed else "")


# Hessian-vector products per hypergradient (power iterations included), by construction;
# "exact" forms the dense 428 x 428 Hessian, "unrolled-10" back-propagates through 10 Adam
# steps (about two backward passes each).
NOMINAL_HVPS = {
    "identity": "0",
    "neumann-1 (lr)": "1",
    "neumann-20": "20 + 20",
    "cg-damped rho=0.1": "20 + 20",
    "cg-damped rho=0.01": "20 + 20",
    "cg-damped rho=0.001, 100 steps": "100 + 20",
    "cg (undamped), 100 steps": "100",
    "exact (undamped dense solve)": "dense H",
    "unrolled-10": "~20 backward",
}


def write_markdown(results: dict, path: Path) -> None:
    a, b = results["A"], results["B"]
    n_points = len(a["points"])
    lines = [
        "# Meta-learned pre-training: which hypergradient through pre-training?",
        "",
        f"Rerun: `{results['rerun']}` ({results['machine']['date']}, "
        f"{results['machine']['cpu_model']}, {results['machine']['torch_threads']} thread, "
        f"load average at start {results['machine']['load_average_at_start'][0]:.2f}; "
        f"{results['seconds'] / 60:.1f} min).",
        "",
        "## A. Against the converged dense reference",
        "",
        f"{n_points} points: pre-training steps {results['stops']} of the `identity` arm's "
        f"meta-pre-training runs, seeds {results['seeds_a']}. Reference: pre-training "
        "re-converged at the current task weights (L-BFGS then Newton, gradient norm "
        f"<= {max(p['converged_grad_norm'] for p in a['points']):.0e}, Hessian eigenvalues "
        f"{min(p['converged_eig_min'] for p in a['points']):.1e} to "
        f"{max(p['converged_eig_max'] for p in a['points']):.1e}, all positive) and one "
        "dense solve. Distance of the warm-started weights from the converged ones: "
        f"{_median_range([p['distance_to_converged'] for p in a['points']])} (relative). "
        "Median [min, max] over the points; HVPs: Hessian-vector products per hyper-step "
        "(power iterations included; a breakdown: CG met negative curvature).",
        "",
        "| hypergradient | HVPs | cosine (warm weights) | rel. error (warm) "
        "| cosine (converged weights) | rel. error (converged) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in a["rows"].items():
        warm_c = [c for c, _ in row["warm"]]
        warm_e = [e for _, e in row["warm"]]
        conv_c = [c for c, _ in row["converged"]]
        conv_e = [e for _, e in row["converged"]]
        lines.append(
            f"| {name} | {NOMINAL_HVPS.get(name, '?')} | {_median_range(warm_c)} | "
            f"{_median_range(warm_e)} | "
            f"{_median_range(conv_c) if conv_c else '-'} | "
            f"{_median_range(conv_e) if conv_e else '-'} |"
        )
    fd = results["fd_check"]
    lines += [
        "",
        f"Reference check (seed {fd['seed']}, step {fd['step']}): directional derivative "
        f"{fd['analytic']:.6e} vs central difference {fd['finite_difference']:.6e} "
        f"(relative error {fd['relative_error']:.1e}).",
        "",
        "## B. Downstream test accuracy after meta-pre-training",
        "",
        f"Seeds {results['seeds_b']}; mean ± standard deviation. Hyper learning rate (and "
        f"rho) chosen per method among {results['hyper_lrs']} (rho in [0.1, 0.01]) by the "
        f"mean downstream validation accuracy (linear probe) on selection seeds "
        f"{results['selection_seeds']}; the test split read once per reported run.",
        "",
        "| pre-training | chosen | noise / useful weight | linear FT | full FT "
        "| HVPs / hyper-step | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, runs in b["final"].items():
        chosen = b["selection"].get(name, {}).get("chosen")
        text = "-"
        if chosen:
            text = f"lr {chosen['hyper_lr']}" + (
                f", rho {chosen['rho']}" if chosen["rho"] is not None else ""
            )
        ratio = _stat([r["weight_ratio"] for r in runs]) if "weight_ratio" in runs[0] else "-"
        hv = f"{statistics.mean(r['hvps_per_hyper_step'] for r in runs):.0f}" if (
            "hvps_per_hyper_step" in runs[0]) else "-"  # fmt: skip
        hv = NOMINAL_HVPS[name] if name == "unrolled-10" else hv
        secs = f"{statistics.mean(r['seconds'] for r in runs):.1f}" if "seconds" in runs[0] else "-"
        lines.append(
            f"| {name} | {text} | {ratio} | {_stat([r['linear_acc'] for r in runs])} | "
            f"{_stat([r['full_acc'] for r in runs])} | {hv} | {secs} |"
        )
    lines += ["", "Selection grid (mean validation accuracy on the selection seeds):", ""]
    for name, sel in b["selection"].items():
        cells = ", ".join(
            f"lr {g['hyper_lr']}" + (f"/rho {g['rho']}" if g["rho"] is not None else "")
            + f": {g['val_acc']:.3f}" for g in sel["grid"]
        )  # fmt: skip
        lines.append(f"- {name}: {cells}")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    rows = results["A"]["rows"]
    names = list(rows)
    for i, name in enumerate(names):
        for j, (where, marker) in enumerate((("warm", "o"), ("converged", "s"))):
            vals = [c for c, _ in rows[name][where] if c == c]
            if vals:
                axes[0].scatter([vals[k] for k in range(len(vals))], [i + 0.15 * j] * len(vals),
                                marker=marker, color=f"C{j}", alpha=0.6,
                                label=f"at {where} weights" if i == 0 else None)  # fmt: skip
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0].axvline(1.0, color="gray", ls=":")
    axes[0].set_xlabel("cosine to the converged dense reference")
    axes[0].legend(fontsize=8)
    final = results["B"]["final"]
    labels = list(final)
    for i, name in enumerate(labels):
        for j, key in enumerate(("linear_acc", "full_acc")):
            vals = [r[key] for r in final[name]]
            axes[1].scatter(vals, [i + 0.15 * j] * len(vals), color=f"C{j}", alpha=0.6,
                            label=("linear FT", "full FT")[j] if i == 0 else None)  # fmt: skip
    axes[1].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[1].set_xlabel("downstream test accuracy (per seed)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, short runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the .md and .png from the existing .json")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.report_only:
        name = "meta_pretrain_quick" if args.quick else "meta_pretrain"
        results = json.loads((args.out / f"{name}.json").read_text())
        write_markdown(results, args.out / f"{name}.md")
        plot(results, args.out / f"{name}.png")
        return
    if args.quick:
        args.steps, args.stops, args.seeds_a = 400, [200, 400], [0]
        args.seeds, args.selection_seeds, args.hyper_lrs = [0], [100], [0.1]
    else:
        args.steps, args.stops, args.seeds_a = 2000, [300, 1000, 2000], [0, 1, 2]
        args.seeds, args.selection_seeds = [0, 1, 2, 3, 4], [100, 101]
        args.hyper_lrs = [0.03, 0.1, 0.3]
    start = time.perf_counter()

    def log(text):
        print(f"[{time.perf_counter() - start:7.1f}s] {text}", flush=True)

    results = {
        "machine": machine_info(threads=1),
        "rerun": rerun_command("meta_pretrain.py", sys.argv[1:]),
        "stops": args.stops,
        "seeds_a": args.seeds_a,
        "seeds_b": args.seeds,
        "selection_seeds": args.selection_seeds,
        "hyper_lrs": args.hyper_lrs,
        "steps": args.steps,
    }
    results["A"] = part_a(args.seeds_a, args.stops, log)
    results["fd_check"] = fd_check(args.seeds_a[0], args.stops[-1])
    log(f"reference check: {results['fd_check']}")
    results["B"] = part_b(args, log)
    results["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    name = "meta_pretrain_quick" if args.quick else "meta_pretrain"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, args.out / f"{name}.md")
    plot(results, args.out / f"{name}.png")
    log(f"wrote {args.out / name}.json/.md/.png")


if __name__ == "__main__":
    main()
