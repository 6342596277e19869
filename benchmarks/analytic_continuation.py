"""Analytic continuation (Huang & Yang, PRB 105, 075112, 2022): the learned unrolled optimizer
against maximum entropy (flat and neural default model), non-negative Tikhonov and a fully
connected network, on held-out synthetic spectra, judged on A(w), never on the residual in G.

* Problem: fermionic kernel, beta = 20, ``--n-tau`` imaginary times, ``--n-w`` frequencies on
  [-8, 8] (trapezoid weights).  Spectra of four families (``hg.continuation.FAMILIES``);
  "quasiparticle" is never seen in training or validation and gets rows of its own.
* Noise: independent Gaussian, sigma = rel * max|G| per spectrum, rel in ``--noise``.
* Data: training and validation sets drawn with their own seeds; the test set (``--n-test``
  spectra per family and noise level) written once to ``<out>/analytic_continuation_test/``
  with a sha256 manifest and read back through ``load_test_set``, once, at the end.
* Every choice is made on the validation set by the L1 error of A (``select``): Tikhonov's
  lambda, MaxEnt's alpha rule and the share of the learned output in MaxEnt's default model
  per noise level; the learned optimizer's number of iterations and learning rate; the
  network's width and learning rate.  The residual in G is recorded beside the L1 error and
  never decides (``tests/test_continuation_benchmark.py`` checks that).
* Metrics per test spectrum: L1 = integral |A - A_true| dw, the main peak's position error
  (argmax of A against argmax of A_true) and weight error (the weight within +-0.5 of the true
  peak), and wall time per spectrum (batched methods: the batch's time over its size).
  Paired comparisons: mean difference of L1 with its standard error and the Wilcoxon
  signed-rank p-value over the same spectra.

Run from the repository root::

    python benchmarks/analytic_continuation.py            # ~15 minutes on 2 CPU cores
    python benchmarks/analytic_continuation.py --quick    # smoke test

Writes ``<out>/analytic_continuation.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

try:
    import hypergradient as hg
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    import hypergradient as hg

from _common import machine_info, rerun_command, write_outputs

ac = hg.continuation
HERE = Path(__file__).resolve()
DEFAULT_OUT = HERE.parent / "results"
SEEN = ("gaussians", "lorentzians", "gapped")
UNSEEN = ("quasiparticle",)
# the metrics and the selection live in the library (the recipe uses them too)
l1_error, peak_errors, residual, select = ac.l1_error, ac.peak_errors, ac.residual, ac.select


# ======================================================================================
# Paired comparisons
# ======================================================================================


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a - b, its standard error, and the Wilcoxon signed-rank p-value."""
    from scipy.stats import wilcoxon

    diff = [x - y for x, y in zip(a, b)]
    se = statistics.stdev(diff) / math.sqrt(len(diff)) if len(diff) > 1 else float("nan")
    p = float(wilcoxon(a, b).pvalue) if len(diff) > 1 and any(diff) else float("nan")
    return {"mean_diff": statistics.mean(diff), "se": se, "wilcoxon_p": p, "n": len(diff)}


# ======================================================================================
# Methods
# ======================================================================================


def per_spectrum(fn: Callable) -> Callable:
    """A batch solver from a one-spectrum solver."""

    def solve(G, sigma):
        return torch.stack([fn(G[i], sigma[i]) for i in range(G.shape[0])])

    return solve


def maxent_solver(
    problem, rule: str, default: Callable | None = None, mix: float = 0.95
) -> Callable:
    def one(G, sigma, D=None):
        s = sigma * torch.ones_like(G) if sigma.dim() == 0 else sigma
        return ac.maxent(G, problem, sigma=s, default_model=D, alpha=rule).A

    if default is None:
        return per_spectrum(one)

    def solve(G, sigma):
        D = default(G, sigma)
        flat = torch.ones_like(D[0]) / problem.grid.integrate(torch.ones_like(D[0]))
        # a default model must be positive everywhere: some of the flat one is mixed in
        D = mix * D + (1 - mix) * flat
        return torch.stack([one(G[i], sigma[i], D[i]) for i in range(G.shape[0])])

    return solve


def tikhonov_solver(problem, lam: float) -> Callable:
    def one(G, sigma):
        s = sigma * torch.ones_like(G) if sigma.dim() == 0 else sigma
        return ac.tikhonov_nnls(G, problem, sigma=s, lam=lam)

    return per_spectrum(one)


def module_solver(module) -> Callable:
    def solve(G, sigma):
        with torch.no_grad():
            return module(G, sigma)

    return solve


def timed(solve: Callable, G, sigma) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    A = solve(G, sigma)
    return A, (time.perf_counter() - start) / G.shape[0]


# ======================================================================================
# The run
# ======================================================================================


def concat(datasets):
    return ac.SpectralDataset(
        A=torch.cat([d.A for d in datasets]),
        G=torch.cat([d.G for d in datasets]),
        G_noisy=torch.cat([d.G_noisy for d in datasets]),
        sigma=torch.cat([d.sigma for d in datasets]),
        family=[f for d in datasets for f in d.family],
        rel_sigma=None,
    )


def run(args, console=print) -> dict:
    torch.manual_seed(args.seed)
    beta = 20.0
    problem = ac.Problem(ac.tau_grid(beta, args.n_tau), beta, ac.uniform_grid(-8.0, 8.0, args.n_w))
    train = {rel: ac.make_dataset(problem, SEEN, args.n_train, rel, seed=args.seed + 1)
             for rel in args.noise}  # fmt: skip
    val = {rel: ac.make_dataset(problem, SEEN, args.n_val, rel, seed=args.seed + 2)
           for rel in args.noise}  # fmt: skip
    train_all, val_all = concat(list(train.values())), concat(list(val.values()))
    result: dict = {"selection": {}, "training": {}}

    # the learned optimizer: unrolled iterations and learning rate chosen on validation
    learned_candidates, learned_models = {}, {}
    for n_iter, lr in itertools.product(args.learned_iters, args.lrs):
        model = ac.LearnedContinuation(problem, n_iter=n_iter)
        history = ac.meta_train(model, train_all, val_all, steps=args.learned_steps, lr=lr,
                                batch_size=args.batch_size, seed=args.seed)  # fmt: skip
        key = f"n_iter={n_iter} lr={lr:g}"
        learned_models[key], learned_candidates[key] = model, module_solver(model)
        result["training"][f"learned {key}"] = history
        console(f"  learned optimizer, {key}: trained")
    name, scores = select(learned_candidates, val_all, problem)
    learned = learned_models[name]
    result["selection"]["learned optimizer"] = {"chosen": name, "scores": scores}

    # the fully connected network: width and learning rate chosen on validation
    fc_candidates, fc_models = {}, {}
    for width, lr in itertools.product(args.fc_widths, args.lrs):
        model = ac.FullyConnectedContinuation(problem, hidden=(width, width))
        history = ac.train_network(model, train_all, val_all, steps=args.fc_steps, lr=lr,
                                   batch_size=args.batch_size, seed=args.seed)  # fmt: skip
        key = f"hidden={width}x2 lr={lr:g}"
        fc_models[key], fc_candidates[key] = model, module_solver(model)
        result["training"][f"network {key}"] = history
        console(f"  network {key}: trained")
    name, scores = select(fc_candidates, val_all, problem)
    network = fc_models[name]
    result["selection"]["network"] = {"chosen": name, "scores": scores}

    # per noise level: Tikhonov's lambda and MaxEnt's alpha rule, on validation
    chosen_lam, chosen_rule, chosen_mix = {}, {}, {}
    for rel in args.noise:
        small = _head(val[rel], args.n_val_maxent)
        name, scores = select({f"lam={lam:g}": tikhonov_solver(problem, lam)
                               for lam in args.tikhonov_lams}, small, problem)  # fmt: skip
        chosen_lam[rel] = float(name.split("=")[1])
        result["selection"][f"tikhonov {rel:g}"] = {"chosen": name, "scores": scores}
        name, scores = select({rule: maxent_solver(problem, rule) for rule in args.maxent_rules},
                              small, problem)  # fmt: skip
        chosen_rule[rel] = name
        result["selection"][f"maxent {rel:g}"] = {"chosen": name, "scores": scores}
        # the share of the learned optimizer's output in MaxEnt's default model
        name, scores = select({f"mix={m:g}": maxent_solver(problem, chosen_rule[rel],
                                                            module_solver(learned), m)
                               for m in args.default_mixes}, small, problem)  # fmt: skip
        chosen_mix[rel] = float(name.split("=")[1])
        result["selection"][f"neural default {rel:g}"] = {"chosen": name, "scores": scores}
        console(f"  noise {rel:g}: lambda {chosen_lam[rel]:g}, alpha rule {chosen_rule[rel]}, "
                f"default-model mix {chosen_mix[rel]:g}")  # fmt: skip

    # the test set: written once (checksummed), read once, here
    folder = args.out / "analytic_continuation_test"
    ac.write_test_set(folder, problem, families=SEEN + UNSEEN, n_per_family=args.n_test,
                      rel_sigmas=args.noise, seed=args.seed + 1000)  # fmt: skip
    _, test_sets = ac.load_test_set(folder)
    neural_default = module_solver(learned)
    methods = {
        "learned optimizer": lambda rel: module_solver(learned),
        "MaxEnt, flat default": lambda rel: maxent_solver(problem, chosen_rule[rel]),
        "MaxEnt, neural default": lambda rel: maxent_solver(problem, chosen_rule[rel],
                                                            neural_default, chosen_mix[rel]),
        "Tikhonov NNLS": lambda rel: tikhonov_solver(problem, chosen_lam[rel]),
        "fully connected network": lambda rel: module_solver(network),
    }  # fmt: skip
    params = {"learned optimizer": learned.num_parameters(),
              "fully connected network": network.num_parameters()}  # fmt: skip
    rows = {}
    for rel, test in test_sets.items():
        for method, make in methods.items():
            A, seconds = timed(make(rel), test.G_noisy, test.sigma)
            pos, weight = peak_errors(problem, A, test.A)
            rows[f"{method} @ {rel:g}"] = {
                "method": method, "noise": rel, "seconds_per_spectrum": seconds,
                "l1": l1_error(problem, A, test.A).tolist(), "peak_position": pos.tolist(),
                "peak_weight": weight.tolist(),
                "residual": residual(problem, A, test.G_noisy, test.sigma).tolist(),
                "family": list(test.family), "parameters": params.get(method),
            }  # fmt: skip
            if rel == args.plot_noise:
                rows[f"{method} @ {rel:g}"]["examples"] = A[:: args.n_test].tolist()
            console(f"  test noise {rel:g}: {method} done ({seconds * 1e3:.1f} ms/spectrum)")
        if rel == args.plot_noise:
            result["plot_truth"] = test.A[:: args.n_test].tolist()
            result["plot_families"] = list(test.family[:: args.n_test])
    result["rows"] = rows
    result["claims"] = claims(rows, args.noise)
    result["omega"] = problem.grid.omega.tolist()
    return result


def _head(dataset, n: int):
    """The first n spectra of every family of a dataset (the rows are grouped by family)."""
    keep = []
    for family in dict.fromkeys(dataset.family):
        idx = [i for i, f in enumerate(dataset.family) if f == family][:n]
        keep += idx
    index = torch.tensor(keep)
    return ac.SpectralDataset(
        A=dataset.A[index], G=dataset.G[index], G_noisy=dataset.G_noisy[index],
        sigma=dataset.sigma[index], family=[dataset.family[i] for i in keep],
        rel_sigma=dataset.rel_sigma,
    )  # fmt: skip


def _seen(row, values):
    return [v for v, f in zip(values, row["family"]) if f in SEEN]


def claims(rows: dict, noises) -> list[dict]:
    """The paper's three claims at each noise level, on the families seen in training."""
    out = []
    for rel in noises:
        learned = rows[f"learned optimizer @ {rel:g}"]
        flat = rows[f"MaxEnt, flat default @ {rel:g}"]
        neural = rows[f"MaxEnt, neural default @ {rel:g}"]
        network = rows[f"fully connected network @ {rel:g}"]
        vs_maxent = paired(_seen(learned, learned["l1"]), _seen(flat, flat["l1"]))
        speedup = flat["seconds_per_spectrum"] / learned["seconds_per_spectrum"]
        out.append({
            "noise": rel, "claim": "learned optimizer at least as accurate as MaxEnt, >= 10x "
            "faster", "paired_l1": vs_maxent, "speedup": speedup,
            "holds": vs_maxent["mean_diff"] <= 0 and speedup >= 10,
        })  # fmt: skip
        vs_network = paired(_seen(learned, learned["l1"]), _seen(network, network["l1"]))
        ratio = network["parameters"] / learned["parameters"]
        out.append({
            "noise": rel, "claim": "learned optimizer matches the network with <= 1/10 of its "
            "parameters", "paired_l1": vs_network, "parameter_ratio": ratio,
            "holds": (vs_network["mean_diff"] <= 2 * vs_network["se"]) and ratio >= 10,
        })  # fmt: skip
        vs_flat = paired(_seen(neural, neural["l1"]), _seen(flat, flat["l1"]))
        out.append({
            "noise": rel, "claim": "the neural default model lowers MaxEnt's error",
            "paired_l1": vs_flat,
            "holds": vs_flat["mean_diff"] < 0 and vs_flat["wilcoxon_p"] < 0.05,
        })  # fmt: skip
    return out


# ======================================================================================
# Report
# ======================================================================================


def _mean_sd(values) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        "# Analytic continuation: learned optimizer, MaxEnt, Tikhonov, network", "",
        f"{result['machine']['date']}, {result['machine']['cpu_model']}, torch "
        f"{result['machine']['torch']}, {result['machine']['torch_threads']} thread(s).  Fermionic "
        f"kernel, beta 20, {a['n_tau']} tau points, {a['n_w']} frequencies on [-8, 8]; "
        f"{a['n_test']} test spectra per family and noise level; trained on {list(SEEN)}, "
        f"'quasiparticle' never seen.  Rerun: `{result['command']}`", "",
        "Every choice (Tikhonov's lambda, MaxEnt's alpha rule, the share of the learned output "
        "in MaxEnt's default model, the learned optimizer's iterations and learning rate, the "
        "network's width and learning rate) was made on validation spectra by the L1 error of "
        "A; the test set was written with a checksum and read once, at the end.", "",
        "| method | noise | families | L1 error | peak position error | peak weight error | "
        "ms / spectrum | parameters |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in result["rows"].values():
        for label, keep in (("seen", SEEN), ("unseen", UNSEEN)):
            pick = lambda v, k=keep, fam=row["family"]: [x for x, f in zip(v, fam) if f in k]  # noqa: E731
            lines.append(
                f"| {row['method']} | {row['noise']:g} | {label} | {_mean_sd(pick(row['l1']))} | "
                f"{_mean_sd(pick(row['peak_position']))} | {_mean_sd(pick(row['peak_weight']))} "
                f"| {1e3 * row['seconds_per_spectrum']:.2f} | {row['parameters'] or '-'} |"
            )
    lines += [
        "",
        "Claims (seen families; paired over the same spectra: mean L1 difference ± "
        "standard error, Wilcoxon p):",
        "",
        "| noise | claim | L1 difference | p | other | holds |",
        "|---|---|---|---|---|---|",
    ]
    for c in result["claims"]:
        other = (
            f"speed-up {c['speedup']:.1f}x"
            if "speedup" in c
            else f"parameter ratio {c['parameter_ratio']:.1f}x"
            if "parameter_ratio" in c
            else ""
        )
        lines.append(
            f"| {c['noise']:g} | {c['claim']} | {c['paired_l1']['mean_diff']:+.4f} ± "
            f"{c['paired_l1']['se']:.4f} | {c['paired_l1']['wilcoxon_p']:.2g} | {other} | "
            f"{'yes' if c['holds'] else 'NO'} |"
        )  # fmt: skip
    lines += ["", "Selection (validation):", ""]
    for what, sel in result["selection"].items():
        scores = ", ".join(f"{n}: L1 {s['val_l1']:.3f} (residual {s['val_residual']:.3g})"
                           for n, s in sel["scores"].items())  # fmt: skip
        lines.append(f"* {what}: **{sel['chosen']}**; {scores}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth = result["plot_truth"]
    omega = result["omega"]
    fig, axes = plt.subplots(1, len(truth), figsize=(3.2 * len(truth), 3), squeeze=False)
    for j, ax in enumerate(axes[0]):
        ax.plot(omega, truth[j], "k", lw=2, label="truth")
        for row in result["rows"].values():
            if "examples" in row:
                ax.plot(omega, row["examples"][j], lw=1, label=row["method"])
        ax.set_title(result["plot_families"][j], fontsize=9)
        ax.set_xlabel("omega")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a tiny run that checks the script")
    p.add_argument("--n-tau", type=int, default=51)
    p.add_argument("--n-w", type=int, default=201)
    p.add_argument("--noise", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    p.add_argument("--n-train", type=int, default=400, help="training spectra per family/noise")
    p.add_argument("--n-val", type=int, default=40, help="validation spectra per family/noise")
    p.add_argument(
        "--n-val-maxent",
        type=int,
        default=8,
        help="validation spectra per family for MaxEnt's and Tikhonov's choices",
    )
    p.add_argument("--n-test", type=int, default=50, help="test spectra per family/noise")
    p.add_argument("--learned-iters", type=int, nargs="+", default=[10, 20])
    p.add_argument("--learned-steps", type=int, default=600)
    p.add_argument("--fc-widths", type=int, nargs="+", default=[256, 512])
    p.add_argument("--fc-steps", type=int, default=1500)
    p.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[1e-3, 1e-2],
        help="Adam rates of the learned optimizer and the network, chosen on validation",
    )
    p.add_argument(
        "--default-mixes",
        type=float,
        nargs="+",
        default=[0.5, 0.8, 0.95],
        help="shares of the learned output in MaxEnt's default model (validation)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--tikhonov-lams", type=float, nargs="+", default=[1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4]
    )
    p.add_argument("--maxent-rules", nargs="+", default=["chi2kink", "classic", "bryan"])
    p.add_argument("--plot-noise", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.n_tau, args.n_w, args.noise, args.plot_noise = 21, 61, [1e-2, 1e-3], 1e-3
        args.n_train, args.n_val, args.n_val_maxent, args.n_test = 8, 4, 2, 3
        args.learned_iters, args.learned_steps, args.fc_widths, args.fc_steps = [3], 5, [16], 5
        args.lrs, args.default_mixes = [1e-2], [0.5, 0.95]
        args.tikhonov_lams, args.maxent_rules = [1e-2, 1e-1], ["chi2kink", "historic"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_default_dtype(torch.float64)
    result = {
        "machine": machine_info(threads=torch.get_num_threads()),
        "command": rerun_command(
            "analytic_continuation.py", sys.argv[1:] if argv is None else argv
        ),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
    }
    result.update(run(args))
    stem = "analytic_continuation_quick" if args.quick else "analytic_continuation"
    write_outputs(args.out, stem, result, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
