"""Which outer solution cold-start and warm-start bilevel optimisation find (Vicol et al. 2022).

The linear model of ``hg.problem.LinearBilevel``: learned training targets ``u`` (one per
synthetic input, the outer parameters) for a linear regression with more features than
synthetic inputs (inner ``0.5 ||X w - u||^2``, ``X`` of shape ``(m, d)``, ``m < d``), and a
validation loss ``0.5 ||V w - y||^2`` with fewer validation examples than targets
(``n < m``): both levels have many solutions.  ``y = V w_true + noise``; a test set from the
same teacher (read once, after every run) shows that *which* outer solution matters.

For every hypergradient approximation the library offers, one cold-start run (the inner
problem re-solved from ``w0`` to ``||grad_w f|| <= 1e-10`` before every outer step) and one
warm-start run (3 inner steps per outer step, weights kept) are compared with the closed form
of ``LinearBilevel.outer_solution`` (or ``unrolled_outer_solution``); the approximations
without a closed form (CG, MINRES, an undamped dense solve) are only measured.

Choices, none tuned on test data (and none tuned at all): inner step ``1 / lambda_max(S)``;
outer step ``max_stable_outer_lr(...) / 2`` from the closed form (warm start the same;
unrolled cold start ``1 / lambda_max`` of its own outer curvature); enough outer steps to
converge (the table shows how close each run got).  Seeds: 5 random problems.

Run from the repository root::

    PYTHONPATH=src python benchmarks/implicit_bias.py           # ~5 minutes
    PYTHONPATH=src python benchmarks/implicit_bias.py --quick   # < 1 minute

Writes ``<out>/implicit_bias.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import hypergradient as hg
from hypergradient.problem import LinearBilevel, run_bilevel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, rerun_command  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DIMS = {"d": 24, "m": 6, "n_val": 2, "n_test": 200}
INNER_TOL = 1e-10
WARM_INNER_STEPS = 3
MAX_INNER_STEPS = 5000  # cold-start guard: a diverging outer run would retrain for ever
NOISE = 0.1


def make_problem(seed: int, d: int, m: int, n_val: int, n_test: int):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    X = randn(m, d) / d**0.5  # synthetic inputs, fixed; their targets are learned
    w_true = randn(d)
    V, T = randn(n_val, d) / d**0.5, randn(n_test, d) / d**0.5
    y = V @ w_true + NOISE * randn(n_val)
    y_test = T @ w_true
    u0, w0 = torch.zeros(m, dtype=torch.float64), 0.1 * randn(d)
    return LinearBilevel(X, V, y), (T, y_test), u0, w0


def approximations(alpha: float, s_min: float, s_max: float):
    """(name, library method, closed form kwargs or None, library call as text).

    The exact hypergradient: no library solver handles the singular Hessian X^T X exactly
    (see the table's errors), so it is a Neumann series with the optimal step
    2 / (s_min + s_max) and enough terms that (I - step S)^(K+1) < 1e-13: N = I to 1e-13."""
    step = 2.0 / (s_min + s_max)
    rate = (s_max - s_min) / (s_max + s_min)
    terms = math.ceil(math.log(1e-13) / math.log(rate))
    return [
        ("exact (Neumann to 1e-13)", hg.Implicit(solver="neumann", max_steps=terms, alpha=step),
         {"approximation": "neumann", "steps": terms, "lr": step},
         f"Implicit(solver='neumann', max_steps={terms}, alpha={step:.3f})"),
        ("damped solve, delta=0.01", hg.Implicit(solver="exact", damping=1e-2),
         {"approximation": "damped", "damping": 1e-2}, "Implicit(solver='exact', damping=0.01)"),
        ("damped solve, delta=0.1", hg.Implicit(solver="exact", damping=1e-1),
         {"approximation": "damped", "damping": 1e-1}, "Implicit(solver='exact', damping=0.1)"),
        ("Neumann K=10", hg.Implicit(solver="neumann", max_steps=10),
         {"approximation": "neumann", "steps": 10, "lr": alpha},
         "Implicit(solver='neumann', max_steps=10)"),
        ("Neumann K=3", hg.Implicit(solver="neumann", max_steps=3),
         {"approximation": "neumann", "steps": 3, "lr": alpha},
         "Implicit(solver='neumann', max_steps=3)"),
        ("identity (Neumann K=0)", hg.Implicit(solver="identity"),
         {"approximation": "identity", "lr": alpha}, "Implicit(solver='identity')"),
        ("truncated unroll, 5 steps", hg.Unrolled(steps=5),
         {"approximation": "unrolled", "steps": 5, "lr": alpha}, "Unrolled(steps=5)"),
        ("CG 3 steps, delta=0.01", hg.Implicit(solver="cg", max_steps=3, damping=1e-2),
         None, "Implicit(solver='cg', max_steps=3, damping=0.01)"),
        ("CG 20 steps, delta=0.01", hg.Implicit(solver="cg", max_steps=20, damping=1e-2),
         {"approximation": "damped", "damping": 1e-2},
         "Implicit(solver='cg', max_steps=20, damping=0.01)"),
        ("CG 20 steps, undamped", hg.Implicit(solver="cg", max_steps=20), None,
         "Implicit(solver='cg', max_steps=20)"),
        ("MINRES 20 steps, undamped", hg.Implicit(solver="minres", max_steps=20), None,
         "Implicit(solver='minres', max_steps=20)"),
        ("dense solve, undamped", hg.Implicit(solver="exact"), None, "Implicit(solver='exact')"),
    ]  # fmt: skip


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _run(prob, u0, w0, method, warm, beta, steps, alpha):
    """One BLO run; an error (the method refusing the singular Hessian) is recorded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # max-steps warnings of CG/MINRES: measured below
            return run_bilevel(
                prob, u0, w0, warm_start=warm, method=method, outer_lr=beta, outer_steps=steps,
                inner_lr=alpha, inner_steps=WARM_INNER_STEPS, inner_tol=None if warm else INNER_TOL,
                max_inner_steps=MAX_INNER_STEPS,
            ), None  # fmt: skip
    except (hg.HypergradientError, hg.ConvergenceError, RuntimeError) as err:
        return None, str(err).split(". ")[0][:160]


def one_seed(seed: int, dims: dict, outer_steps: int, log) -> dict:
    prob, (T, y_test), u0, w0 = make_problem(seed, **dims)
    S_eigs = torch.linalg.eigvalsh(prob.inner_x @ prob.inner_x.T)
    alpha = 1.0 / float(S_eigs.max())
    s_min, s_max = float(S_eigs.min()), float(S_eigs.max())
    u_exact = prob.outer_solution(u0, w0)
    scale = float(torch.linalg.vector_norm(u_exact - u0))

    def losses(w):
        val = float(prob.outer_loss({"w": w}))
        test = 0.5 * float(torch.mean((T @ w - y_test) ** 2))
        return val, test

    rows = []
    for name, method, closed, call in approximations(alpha, s_min, s_max):
        beta_closed = closed if closed is not None else {"approximation": "exact"}
        beta = prob.max_stable_outer_lr(**beta_closed) / 2
        row = {"name": name, "call": call}
        target = prob.outer_solution(u0, w0, **closed) if closed is not None else None
        if target is not None:
            row["closed_form_distance_from_min_norm"] = float(
                torch.linalg.vector_norm(target - u_exact) / scale
            )
            w_t = prob.inner_solution(target, w0)
            row["closed_form_val_loss"], row["closed_form_test_loss"] = losses(w_t)
        for start in ("cold", "warm"):
            if start == "cold" and isinstance(method, hg.Unrolled):
                # a cold start differentiates its retraining from w0: the table below
                row[start] = {"skipped": True}
                continue
            t0 = time.perf_counter()
            run, error = _run(prob, u0, w0, method, start == "warm", beta, outer_steps, alpha)
            entry = {"seconds": time.perf_counter() - t0, "error": error}
            if run is not None:
                w_conv = prob.inner_solution(run.u, w0)  # the inner problem re-solved at u
                entry.update(
                    distance_from_min_norm=float(torch.linalg.vector_norm(run.u - u_exact) / scale),
                    rel_error_vs_closed_form=None if target is None else _rel(run.u, target),
                    val_loss=losses(w_conv)[0],
                    test_loss=losses(w_conv)[1],
                    mean_inner_steps=statistics.fmean(run.inner_steps),
                    inner_guard_hits=sum(k >= MAX_INNER_STEPS for k in run.inner_steps),
                )  # fmt: skip
            row[start] = entry
        rows.append(row)
        log(f"  seed {seed} {name:32s} cold {_fmt(row['cold'])} | warm {_fmt(row['warm'])}")
    unrolled = []
    for steps in (1, 5, 20):
        target = prob.unrolled_outer_solution(u0, w0, steps, alpha)
        A, _ = prob._residual(w0)
        B = A @ prob.preconditioner("unrolled", steps=steps, lr=alpha)
        beta = 1.0 / float(torch.linalg.eigvalsh(B.T @ B).max())
        run = run_bilevel(
            prob, u0, w0, warm_start=False, method=hg.Unrolled(steps=steps), outer_lr=beta,
            outer_steps=outer_steps, inner_lr=alpha,
        )  # fmt: skip
        w_T = prob.inner_iterate(run.u, w0, steps, alpha)
        unrolled.append(
            {
                "steps": steps,
                "rel_error_vs_closed_form": _rel(run.u, target),
                "distance_from_min_norm": float(torch.linalg.vector_norm(target - u_exact) / scale),
                "val_loss_T_step_model": losses(w_T)[0],
                "val_loss_retrained_to_convergence": losses(prob.inner_solution(run.u, w0))[0],
                "test_loss_retrained_to_convergence": losses(prob.inner_solution(run.u, w0))[1],
            }
        )
    return {
        "seed": seed,
        "alpha": alpha,
        "S_eigenvalues": [float(x) for x in S_eigs],
        "min_norm_val_loss": losses(prob.inner_solution(u_exact, w0))[0],
        "min_norm_test_loss": losses(prob.inner_solution(u_exact, w0))[1],
        "rows": rows,
        "unrolled_cold": unrolled,
    }


def _fmt(entry: dict) -> str:
    if entry.get("skipped"):
        return "see the unrolled cold-start table"
    if entry.get("error"):
        return "error"
    rel = entry.get("rel_error_vs_closed_form")
    rel_txt = "   n/a  " if rel is None else f"{rel:.1e}"
    return f"vs closed form {rel_txt}, from min-norm {entry['distance_from_min_norm']:.3f}"


def trajectory_demo(outer_steps: int) -> dict:
    """m = 2 targets, one validation example: the outer optima form a line in the plane of
    u; each approximation's cold-start path ends on it at its own closed-form point."""
    prob, _, u0, w0 = make_problem(123, d=6, m=2, n_val=1, n_test=1)
    u0 = torch.tensor([1.5, -1.0], dtype=torch.float64)
    S_eigs = torch.linalg.eigvalsh(prob.inner_x @ prob.inner_x.T)
    alpha = 1.0 / float(S_eigs.max())
    out = {"paths": {}, "closed_forms": {}}
    for name, method, closed, _ in approximations(alpha, float(S_eigs.min()), alpha**-1):
        skip = ("CG", "damped solve, delta=0.01", "truncated")  # no closed form / unrolled
        if closed is None or name.startswith(skip):
            continue
        beta = prob.max_stable_outer_lr(**closed) / 4
        run = run_bilevel(
            prob, u0, w0, warm_start=False, method=method, outer_lr=beta,
            outer_steps=outer_steps, inner_lr=alpha, inner_tol=INNER_TOL,
        )  # fmt: skip
        out["paths"][name] = run.u_path.tolist()
        out["closed_forms"][name] = prob.outer_solution(u0, w0, **closed).tolist()
    A, r = prob._residual(w0)  # the line A u = r
    out["line"] = {"a": A[0].tolist(), "r": float(r[0])}
    out["u0"] = u0.tolist()
    return out


def summarize(seeds: list[dict]) -> list[dict]:
    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "max": max(values),
        }

    table = []
    for i, row in enumerate(seeds[0]["rows"]):
        per = [s["rows"][i] for s in seeds]
        entry = {"name": row["name"], "call": row["call"]}
        for start in ("cold", "warm"):
            runs = [p[start] for p in per]
            if any(r.get("skipped") for r in runs):
                entry[start] = None
                continue
            errors = [r["error"] for r in runs if r.get("error")]
            entry[start] = {
                "errors": len(errors),
                "first_error": errors[0] if errors else None,
                "rel_error_vs_closed_form": stats(
                    [r.get("rel_error_vs_closed_form") for r in runs if not r.get("error")]
                ),
                "distance_from_min_norm": stats(
                    [r.get("distance_from_min_norm") for r in runs if not r.get("error")]
                ),
                "val_loss": stats([r.get("val_loss") for r in runs if not r.get("error")]),
                "test_loss": stats([r.get("test_loss") for r in runs if not r.get("error")]),
            }
        entry["closed_form_distance_from_min_norm"] = stats(
            [p.get("closed_form_distance_from_min_norm") for p in per]
        )
        table.append(entry)
    return table


def _ms(st, fmt=".3f") -> str:
    if st is None:
        return "n/a"
    if abs(st["mean"]) > 1e3:  # diverged runs
        fmt = ".1e"
    return f"{st['mean']:{fmt}} ± {st['std']:{fmt}}"


def markdown_report(result: dict) -> str:
    m = result["machine"]
    cfg = result["config"]
    lines = [
        "# Implicit bias of cold- and warm-start bilevel optimisation (Vicol et al. 2022)",
        "",
        f"Date {m['date']}; {m['cpu_model']}, torch {m['torch']}, {m['torch_threads']} "
        f"thread(s), load average at start {m['load_average_at_start']}.",
        f"Rerun: `{result['command']}`",
        "",
        f"Problem (`hg.problem.LinearBilevel`): learned targets u for m={cfg['m']} synthetic "
        f"inputs in d={cfg['d']} features (inner `0.5||Xw-u||^2`), validation loss "
        f"`0.5||Vw-y||^2` on n={cfg['n_val']} examples, `y = V w_true + {NOISE} noise`; test "
        f"loss: mean `0.5 (t.w - t.w_true)^2` over {cfg['n_test']} test inputs, read once "
        f"after the runs.  u0 = 0, w0 ~ 0.1 N(0, I).  Seeds {cfg['seeds']} "
        f"(one random problem each); mean ± std over them.",
        "",
        f"Cold start: w reset to w0 and re-solved to `||grad_w f|| <= {INNER_TOL:g}` before "
        f"every outer step (mean {result['cold_inner_steps']:.0f} inner steps each in the runs "
        f"that converged; guard {MAX_INNER_STEPS} steps).  Warm "
        f"start: {WARM_INNER_STEPS} inner steps per outer step, weights kept.  "
        f"{cfg['outer_steps']} outer steps of size `max_stable_outer_lr(...)/2` (from the "
        f"closed form; no tuning); inner step `1/lambda_max(XX^T)`.",
        "",
        "*vs closed form*: `||u - u_cf|| / ||u_cf||` for the run's final u against "
        "`LinearBilevel.outer_solution` with that approximation's N.  *from min-norm*: "
        "`||u - u_exact|| / ||u_exact - u0||`, where u_exact is the minimum-norm outer "
        "solution (the exact hypergradient's).  Losses at the inner problem re-solved at the "
        "final u.",
        "",
        "| approximation | library call | cold: vs closed form (max) | warm: vs closed form "
        "(max) | closed form: from min-norm | val loss (cold run) | test loss (cold run) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["table"]:
        cells = []
        for start in ("cold", "warm"):
            st = row[start]
            if st is None:
                cells.append("see the unrolled table below")
            elif st["errors"]:
                cells.append(f"error in {st['errors']}/{cfg['seeds']} seeds")
            elif st["rel_error_vs_closed_form"] is None:
                cells.append(f"no closed form; from min-norm {_ms(st['distance_from_min_norm'])}")
            else:
                cells.append(f"{st['rel_error_vs_closed_form']['max']:.1e}")
        cold = row["cold"] or row["warm"]  # unrolled: the warm run's losses
        lines.append(
            f"| {row['name']} | `{row['call']}` | {cells[0]} | {cells[1]} | "
            f"{_ms(row['closed_form_distance_from_min_norm'])} | "
            f"{_ms(cold['val_loss'], '.2e')} | {_ms(cold['test_loss'])} |"
        )
    errors = {
        row["name"]: row[s]["first_error"]
        for row in result["table"]
        for s in ("cold", "warm")
        if row[s] is not None and row[s]["first_error"]
    }
    if errors:
        lines += ["", "Errors (first message per method):", ""]
        lines += [f"- {name}: {msg}" for name, msg in errors.items()]
    lines += [
        "",
        "Cold start that retrains only T steps from w0 and differentiates through them "
        "(`Unrolled(steps=T)` at w0; closed form `unrolled_outer_solution`):",
        "",
        "| T | vs closed form (max) | closed form: from min-norm | val loss, T-step model "
        "| val loss, retrained to convergence | test loss, retrained |",
        "|---|---|---|---|---|---|",
    ]
    for entry in result["unrolled_table"]:
        lines.append(
            f"| {entry['steps']} | {entry['rel_error_vs_closed_form']['max']:.1e} | "
            f"{_ms(entry['distance_from_min_norm'])} | {_ms(entry['val_loss_T_step_model'], '.2e')}"
            f" | {_ms(entry['val_loss_retrained_to_convergence'], '.2e')} | "
            f"{_ms(entry['test_loss_retrained_to_convergence'])} |"
        )
    lines += [
        "",
        f"Minimum-norm solution (exact hypergradient), test loss {_ms(result['min_norm_test'])}.",
        f"Wall time {result['wall_s']:.0f} s.",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    ax = axes[0]
    demo = result["trajectory_demo"]
    a, r = demo["line"]["a"], demo["line"]["r"]
    pts = [p for path_ in demo["paths"].values() for p in path_]
    xs = [p[0] for p in pts]
    lo, hi = min(xs) - 0.5, max(xs) + 0.5
    grid = torch.linspace(lo, hi, 50)
    ax.plot(grid, (r - a[0] * grid) / a[1], "k-", lw=1, label="outer optima (V w*(u) = y)")
    for name, path_ in demo["paths"].items():
        line = ax.plot([p[0] for p in path_], [p[1] for p in path_], lw=1.2, label=name)[0]
        cf = demo["closed_forms"][name]
        ax.plot(cf[0], cf[1], "o", mfc="none", ms=10, color=line.get_color())
    ax.plot(*demo["u0"], "ks", label="u0")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("u[0]")
    ax.set_ylabel("u[1]")
    ax.set_title("cold-start paths (lines) end at the closed forms (circles)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for row in result["seeds"][0]["rows"]:
        if row.get("closed_form_distance_from_min_norm") is None:
            continue
        xs, ys = [], []
        for s in result["seeds"]:
            for r_ in s["rows"]:
                for start in ("cold", "warm"):
                    if r_["name"] == row["name"] and r_[start].get("distance_from_min_norm"):
                        xs.append(r_["closed_form_distance_from_min_norm"])
                        ys.append(r_[start]["distance_from_min_norm"])
        ax.plot(xs, ys, "o", label=row["name"], ms=5, mfc="none")
    top = 1.1 * max(
        (r_["closed_form_distance_from_min_norm"] for s in result["seeds"] for r_ in s["rows"]
         if r_.get("closed_form_distance_from_min_norm") is not None),
        default=1.0,
    )  # fmt: skip
    ax.plot([0, top], [0, top], "k:", lw=1)
    ax.set_xlabel("closed form: ||u_cf - u_exact|| / ||u_exact - u0||")
    ax.set_ylabel("run (cold and warm): ||u - u_exact|| / ||u_exact - u0||")
    ax.set_title("all seeds, cold and warm: run vs closed form")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 60 outer steps")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 5)")
    parser.add_argument("--outer-steps", type=int, default=None, help="default 150")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument(
        "--replot", action="store_true", help="redraw <out>/implicit_bias.png from its JSON"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        plot(
            json.loads((args.out / "implicit_bias.json").read_text()),
            args.out / "implicit_bias.png",
        )
        return 0
    torch.set_num_threads(args.threads)
    n_seeds = args.seeds or (2 if args.quick else 5)
    outer_steps = args.outer_steps or (60 if args.quick else 150)
    started = time.perf_counter()
    result = {
        "machine": machine_info(threads=args.threads),
        "command": rerun_command("implicit_bias.py", sys.argv[1:]),
        "config": {**DIMS, "seeds": n_seeds, "outer_steps": outer_steps,
                   "inner_tol": INNER_TOL, "warm_inner_steps": WARM_INNER_STEPS},
    }  # fmt: skip
    seeds = []
    for seed in range(n_seeds):
        seeds.append(one_seed(seed, DIMS, outer_steps, lambda s: print(s, flush=True)))
    result["seeds"] = seeds
    result["table"] = summarize(seeds)
    result["cold_inner_steps"] = statistics.fmean(
        r["cold"]["mean_inner_steps"]
        for s in seeds
        for r in s["rows"]
        if r["cold"].get("mean_inner_steps") is not None and not r["cold"]["inner_guard_hits"]
    )
    unrolled_table = []
    for i, entry in enumerate(seeds[0]["unrolled_cold"]):
        per = [s["unrolled_cold"][i] for s in seeds]
        agg = {"steps": entry["steps"]}
        for key in entry:
            if key != "steps":
                vals = [p[key] for p in per]
                agg[key] = {
                    "mean": statistics.fmean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                    "max": max(vals),
                }
        unrolled_table.append(agg)
    result["unrolled_table"] = unrolled_table
    tests = [s["min_norm_test_loss"] for s in seeds]
    result["min_norm_test"] = {
        "mean": statistics.fmean(tests),
        "std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
    }
    result["trajectory_demo"] = trajectory_demo(100 if args.quick else 200)
    result["wall_s"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "implicit_bias.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "implicit_bias.md").write_text(markdown_report(result))
    plot(result, args.out / "implicit_bias.png")
    print(markdown_report(result))
    print(f"wrote {args.out}/implicit_bias.* in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
