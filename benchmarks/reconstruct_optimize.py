"""Benchmark: optimisation-based reconstruction with recovered soft labels (methods.md section 1).

Untrained LeNet (3 x 32 x 32, K = 100, uniform init) captured with label smoothing and
with mixup, one image per gradient. For every label source (the true soft label, the
one-hot label of its top class, DLG-style joint label optimisation, and gitool's
recovered label from ``recover_labels(update, "lambda")``) and every term set (g, f, gf)
it reports the mean PSNR / SSIM after Hungarian matching. Features for the f / gf terms
are the bias ratio x = G^T g / <g, g> (exact for a model with a last-layer bias, which is
what the server computes).

ResNet-18 (PyTorch's default initialisation, as in Inverting Gradients; --resnet-init
uniform reproduces the LeNet-style U(-0.5, 0.5) draw, under which activations explode
through the eval-mode batch norms) follows with g terms, one image per gradient, in eval
and train batch-norm mode, with Inverting Gradients' settings (cosine, TV 1e-2, signed
Adam). Last, iterations per second of gitool's matcher against a straightforward PyTorch
loop of the same loss (cosine over all layers + TV, Adam, clamp).

--record FILE keeps per-image results (JSON lines) so a long table can be stopped and
resumed, or split into --parts / --families / --labels runs that share the file.
Prints markdown tables as rows finish. Smaller runs: --images 2 --iterations 20.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's gitool, not an installed one

from gitool.attacks import soft_label
from gitool.attacks.gradient_matching import ClientTraining, GradientMatcher, MatchConfig, total_variation
from gitool.capture import CaptureConfig, capture, soft_cross_entropy
from gitool.data import open_source
from gitool.errors import GitoolError, UsageError
from gitool.files import InputSpec, LossSpec, TrainingSpec, new_result
from gitool.metrics import score_images
from gitool.models import ModelSpec
from gitool.reconstruct import reconstruct

FAMILIES = {
    "smoothing": LossSpec(family="smoothing", label_smoothing=0.1),
    "mixup": LossSpec(family="mixup", mixup_alpha=1.0),
}


def client_round(spec: ModelSpec, loss: LossSpec, seed: int, data: str, init: str = "uniform",
                 model_mode: str = "train"):
    source = open_source(data, spec.input_shape, num_classes=spec.num_classes, seed=seed)
    config = CaptureConfig(input=InputSpec(shape=spec.input_shape), loss=loss, seed=seed, init=init,
                           training=TrainingSpec(model_mode=model_mode))
    return capture(source, spec, config, provenance={"data": data})


def bias_feature(update) -> torch.Tensor:
    last = update.last_layer()
    if last.bias_grad is None:
        raise GitoolError("the bias-ratio feature needs a last-layer bias")
    return soft_label.bias_feature(last.weight_grad, last.bias_grad)[None]


def label_rows(update, truth, source: str):
    """(labels N x K or None for joint, note) for one label source."""
    if source == "true":
        return truth.labels.to(torch.float64), ""
    if source == "onehot":
        return torch.eye(truth.labels.shape[1], dtype=torch.float64)[truth.labels.argmax(dim=1)], ""
    if source == "joint":
        return None, ""
    if source != "recovered":  # a typo must not silently run another row
        raise SystemExit(f"unknown label source {source!r}; choose true, onehot, joint, recovered")
    from gitool.labels import recover_labels

    try:
        outcome = recover_labels(update, "lambda", {})
    except UsageError as exc:
        return "pending", str(exc)
    return outcome.labels.to(torch.float64), ""


class Record:
    """Per-image results, one JSON line each, appended as soon as an image finishes; a
    rerun with the same file skips the (row, image) pairs it already holds, so a long
    table can be stopped and resumed, and rows can be split across runs."""

    def __init__(self, path: str | None, settings: dict):
        self.path = Path(path) if path else None
        self.settings = settings
        self.done: dict[tuple, dict] = {}
        if self.path and self.path.exists():
            for line in self.path.read_text().splitlines():
                item = json.loads(line)
                if item.get("settings") == settings:  # other settings are other experiments
                    self.done[tuple(item["key"])] = item

    def get(self, key: tuple) -> dict | None:
        return self.done.get(tuple(json.loads(json.dumps(list(key)))))

    def add(self, key: tuple, values: dict) -> None:
        item = {"key": list(key), "settings": self.settings, **values}
        self.done[tuple(item["key"])] = item
        if self.path:
            with self.path.open("a") as handle:
                handle.write(json.dumps(item) + "\n")


def run_row(updates, truths, source: str, terms: str, options: dict, record: Record | None = None,
            row_key: tuple = ()):
    """Mean PSNR / SSIM over the images and outer iterations per CPU second."""
    psnrs, ssims = [], []
    elapsed, iterations = 0.0, 0
    for index, (update, truth) in enumerate(zip(updates, truths)):
        key = (*row_key, source, terms, index)
        cached = record.get(key) if record else None
        if cached is not None:
            psnrs.append(cached["psnr"])
            ssims.append(cached["ssim"])
            elapsed += cached["cpu_s"]
            iterations += cached["iterations"]
            continue
        labels, note = label_rows(update, truth, source)
        if isinstance(labels, str):
            return None, note
        labels_file = None if labels is None else new_result("labels", {"labels": labels}, method=source,
                                                             update=update)
        features_file = new_result("features", {"features": bias_feature(update)}, method="bias", update=update)
        start = time.process_time()
        out = reconstruct(update, labels_file, features_file if terms != "g" else None, "optimize",
                          {**options, "terms": terms})
        cpu = time.process_time() - start
        elapsed += cpu
        iterations += options["iterations"]
        scores = score_images(out.images, truth.images)
        psnrs.append(scores["psnr"])
        ssims.append(scores["ssim"])
        if record:
            record.add(key, {"psnr": scores["psnr"], "ssim": scores["ssim"], "cpu_s": cpu,
                             "iterations": options["iterations"]})
    return (statistics.mean(psnrs), statistics.mean(ssims), len(psnrs), iterations / elapsed), ""


# --------------------------------------------------------------------------- timing


def naive_loop(model, normalize, image_shape, target: dict, labels, iterations: int, tv: float, lr: float = 0.1):
    """The same objective written the straightforward way: target norms recomputed and a
    .item() host sync every iteration, module parameters differentiated directly."""
    images = torch.rand((labels.shape[0], *image_shape)).requires_grad_(True)
    optimizer = torch.optim.Adam([images], lr=lr)
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    history = []
    for _ in range(iterations):
        optimizer.zero_grad()
        loss = soft_cross_entropy(model(normalize(images)), labels)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        dot, dummy_norm, target_norm = 0, 0, 0
        for name, g in zip(names, grads):
            t = target[name]
            dot = dot + (g * t).sum()
            dummy_norm = dummy_norm + g.pow(2).sum()
            target_norm = target_norm + t.pow(2).sum()
        objective = 1 - dot / dummy_norm.sqrt() / target_norm.sqrt() + tv * total_variation(images)
        objective.backward()
        optimizer.step()
        with torch.no_grad():
            images.clamp_(0, 1)
        history.append(objective.item())
    return history


def timing(update, truth, iterations: int, repeats: int, tv: float, restarts: int = 4) -> dict[str, float]:
    """Iterations per CPU second (restart-iterations for several restarts), median of
    ``repeats``: the straightforward loop (one restart), gitool with one restart, gitool
    with ``restarts`` restarts one by one and together (batched)."""
    model = update.build_model(dtype=torch.float32)
    target = {n: v.float() for n, v in update.values.items()}
    labels = truth.labels.float()
    rates: dict[str, list[float]] = {"naive": [], "gitool": [], "sequential": [], "together": []}

    def matcher(r: int) -> GradientMatcher:
        return GradientMatcher(model, update.input.normalize, target, ClientTraining("gradient", 1),
                               MatchConfig(iterations=iterations, tv=tv, restarts=r, report_every=50), labels=labels)

    # Iterations per CPU second of this process (one thread): wall time on the shared machine
    # mostly measures the other users. Alternate the variants, median of the repeats.
    naive_loop(model, update.input.normalize, update.input.shape, target, labels, 5, tv)  # warm-up
    for _ in range(repeats):
        start = time.process_time()
        naive_loop(model, update.input.normalize, update.input.shape, target, labels, iterations, tv)
        rates["naive"].append(iterations / (time.process_time() - start))
        start = time.process_time()
        matcher(1).run(update.input.shape)
        rates["gitool"].append(iterations / (time.process_time() - start))
        one_by_one = matcher(restarts)
        one_by_one.batchable = lambda: False
        start = time.process_time()
        one_by_one.run(update.input.shape)
        rates["sequential"].append(iterations * restarts / (time.process_time() - start))
        together = matcher(restarts)
        if not together.batchable():
            raise SystemExit("this model's restarts cannot run together (train-mode batch norm or dropout)")
        start = time.process_time()
        together.run(update.input.shape)
        rates["together"].append(iterations * restarts / (time.process_time() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


# --------------------------------------------------------------------------- quality against time

# Settings compared by the curve part; iterations are a ceiling (the CPU cap stops the run).
CURVE_CONFIGS = {
    "lbfgs-l2": {"optimizer": "lbfgs", "distance": "l2", "tv": 0.0, "line_search": True, "iterations": 1_000_000},
    "lbfgs-cosine": {"optimizer": "lbfgs", "distance": "cosine", "tv": 1e-2, "line_search": True,
                     "iterations": 1_000_000},
    "adam-cosine-4800": {"optimizer": "adam", "distance": "cosine", "tv": 1e-2, "iterations": 4800},
    "adam-signed-2000": {"optimizer": "adam", "distance": "cosine", "tv": 1e-2, "signed": True, "iterations": 2000},
    "adam-signed-400": {"optimizer": "adam", "distance": "cosine", "tv": 1e-2, "signed": True, "iterations": 400},
}


def curve_points(update, truth, labels_file, options: dict, cap: float, every: int, plateau: bool = True
                 ) -> list[dict]:
    """PSNR / SSIM of the current images every ``every`` iterations against the seconds
    spent (process CPU and wall, scoring excluded), until ``cap`` CPU seconds; the last
    point is the result the command would write (its best iterate)."""
    from gitool.reconstruct_optimize import reconstruct_optimize

    points: list[dict] = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    spent = [0.0, 0.0]  # scoring time, excluded

    def clock() -> tuple[float, float]:
        return time.perf_counter() - wall0 - spent[0], time.process_time() - cpu0 - spent[1]

    def snap(restart: int, iteration: int, images: torch.Tensor) -> None:
        w, c = time.perf_counter(), time.process_time()
        wall, cpu = clock()
        scores = score_images(images.to(torch.float64).clamp(0, 1), truth.images)
        points.append({"iteration": iteration, "wall_s": wall, "cpu_s": cpu, "psnr": scores["psnr"],
                       "ssim": scores["ssim"]})
        spent[0] += time.perf_counter() - w
        spent[1] += time.process_time() - c

    losses: list[float] = []

    def stop() -> str | None:
        if clock()[1] >= cap:
            return "cap"
        # Converged: the objective moved less than 0.1 % over the last 8 reports (every
        # later point would equal the last one; the curve keeps its value to the cap).
        if plateau and len(losses) >= 9 and abs(losses[-9] - losses[-1]) <= 1e-3 * abs(losses[-9]):
            return "plateau"
        return None

    out = reconstruct_optimize(update, {**options, "save_every": every, "report_every": every}, labels_file,
                               progress=lambda done, total, info: losses.append(info["loss"]), snapshot=snap,
                               stop=stop)
    wall, cpu = clock()
    scores = score_images(out.images, truth.images)
    points.append({"iteration": out.diagnostics["iterations_done"], "wall_s": wall, "cpu_s": cpu,
                   "psnr": scores["psnr"], "ssim": scores["ssim"], "final": True,
                   "stopped": out.diagnostics["stopped"]})
    return points


def at_time(points: list[dict], seconds: float, clock: str = "cpu_s") -> dict | None:
    """The last point reached within ``seconds`` (a run that ended earlier keeps its result)."""
    reached = [p for p in points if p[clock] <= seconds]
    return reached[-1] if reached else None


def curve_table(runs: dict[str, list[list[dict]]], grid: list[float], clock: str = "cpu_s") -> list[str]:
    """Markdown rows: per setting and time, the median PSNR / SSIM over the images (and how
    many images had a point by then)."""
    lines = ["| setting | seconds | median PSNR (dB) | median SSIM | images |", "|---|---|---|---|---|"]
    for name, images in runs.items():
        for seconds in grid:
            reached = [p for p in (at_time(points, seconds, clock) for points in images) if p is not None]
            if not reached:
                lines.append(f"| {name} | {seconds:g} | - | - | 0/{len(images)} |")
                continue
            psnr_ = statistics.median(p["psnr"] for p in reached)
            ssim_ = statistics.median(p["ssim"] for p in reached)
            lines.append(f"| {name} | {seconds:g} | {psnr_:.2f} | {ssim_:.3f} | {len(reached)}/{len(images)} |")
    return lines


def plot_curves(runs: dict[str, list[list[dict]]], grid: list[float], path: str, title: str) -> None:
    """Median PSNR (solid) and SSIM (dashed, right axis) against CPU seconds, one colour per setting."""
    from gitool.atomic import write_atomic
    from gitool.plotting import figure_png, new_figure

    fig, axis = new_figure(8, 4.5)
    right = axis.twinx()
    for index, (name, images) in enumerate(runs.items()):
        colour = f"C{index}"
        xs, ps, ss = [], [], []
        for seconds in grid:
            reached = [p for p in (at_time(points, seconds) for points in images) if p is not None]
            if len(reached) == len(images):
                xs.append(seconds)
                ps.append(statistics.median(p["psnr"] for p in reached))
                ss.append(statistics.median(p["ssim"] for p in reached))
        axis.plot(xs, ps, color=colour, label=f"{name} PSNR")
        right.plot(xs, ss, color=colour, linestyle="--", label=f"{name} SSIM")
    axis.set_xlabel("CPU seconds, one thread (= wall seconds on a quiet machine)")
    axis.set_ylabel("median PSNR (dB), solid")
    right.set_ylabel("median SSIM, dashed")
    axis.set_title(title, fontsize=9)
    axis.grid(True, alpha=0.3)
    handles = axis.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    axis.legend(handles=handles, fontsize=7, loc="lower right")
    write_atomic(path, figure_png(fig))


def run_curves(model: str, spec: ModelSpec, configs: list[str], images: int, data: str, cap: float, every: int,
               record: str | None, grid: list[float], png: str | None, init: str = "uniform",
               mode: str = "train", threads: int = 1, plateau: bool = True) -> None:
    import os

    runs: dict[str, list[list[dict]]] = {}
    rounds = [client_round(spec, FAMILIES["smoothing"], seed, data, init, mode) for seed in range(images)]
    for name in configs:
        options = {**CURVE_CONFIGS[name], "device": "cpu"}
        settings = {"part": "curve", **options, "cap": cap, "every": every, "data": data, "init": init,
                    "mode": mode, "threads": threads, "plateau": "0.1% over 8 reports" if plateau else None}
        store = Record(record, settings)
        runs[name] = []
        for index, (update, truth) in enumerate(rounds):
            key = (model, name, index)
            cached = store.get(key)
            if cached is None:
                labels, note = label_rows(update, truth, "recovered")
                if isinstance(labels, str):
                    raise SystemExit(f"recovered labels unavailable: {note}")
                labels_file = new_result("labels", {"labels": labels}, method="lambda", update=update)
                load = os.getloadavg()[0]
                points = curve_points(update, truth, labels_file, options, cap, every, plateau)
                cached = {"points": points, "load_before": load, "load_after": os.getloadavg()[0]}
                store.add(key, cached)
                last = points[-1]
                print(f"  {model} {name} image {index}: {last['psnr']:.2f} dB, SSIM {last['ssim']:.3f} after "
                      f"{last['iteration']} iterations, {last['cpu_s']:.1f} CPU s, {last['wall_s']:.1f} wall s, load "
                      f"{load:.2f}-{cached['load_after']:.2f}", flush=True)
            runs[name].append(cached["points"])
    print(f"\n{model}: median over {images} images, recovered soft labels, data {data}, seconds of process CPU time "
          f"(one thread; on a quiet machine the wall time)\n")
    print("\n".join(curve_table(runs, grid)))
    print("\nthe same against wall seconds on this (shared) machine\n")
    print("\n".join(curve_table(runs, grid, "wall_s")))
    if png:
        plot_curves(runs, grid, png, f"{model}, {images} images ({data}), recovered soft labels")
        print(f"\nwrote {png}")


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20, help="images (gradients) per row")
    parser.add_argument("--optimizer", default="lbfgs", help="lbfgs (DLG: 300 x 20 evaluations) or adam (IG: 4800)")
    parser.add_argument("--distance", default="l2", help="l2 (DLG) or cosine (Inverting Gradients)")
    parser.add_argument("--iterations", type=int, default=300, help="iterations per reconstruction")
    parser.add_argument("--line-search", action=argparse.BooleanOptionalAction, default=False,
                        help="L-BFGS with strong Wolfe (default: DLG's plain steps)")
    parser.add_argument("--parts", default="lenet,resnet,timing", help="which parts to run, comma-separated")
    parser.add_argument("--record", default=None, help="JSON-lines file of per-image results: appended as images "
                        "finish; a rerun with the same settings reuses them (resume)")
    parser.add_argument("--families", default="smoothing,mixup")
    parser.add_argument("--labels", default="true,onehot,joint,recovered")
    parser.add_argument("--terms", default="g,f,gf")
    parser.add_argument("--tv", type=float, default=0.0)
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--resnet-width", type=int, default=64, help="ResNet-18 base width (64 = standard)")
    parser.add_argument("--resnet-images", type=int, default=3)
    parser.add_argument("--resnet-modes", default="eval,train", help="batch-norm mode(s) of the client")
    parser.add_argument("--resnet-labels", default="true,recovered")
    parser.add_argument("--resnet-init", default="default", help="default (PyTorch's, as Inverting Gradients) or "
                        "uniform (U(-0.5, 0.5) everywhere: activations explode through 17 eval-mode BN layers)")
    parser.add_argument("--resnet-optimizer", default="adam")
    parser.add_argument("--resnet-distance", default="cosine")
    parser.add_argument("--resnet-tv", type=float, default=1e-2)
    parser.add_argument("--resnet-iterations", type=int, default=200)
    parser.add_argument("--resnet-signed", action=argparse.BooleanOptionalAction, default=True,
                        help="Adam on the sign of the image gradient (Inverting Gradients' code)")
    parser.add_argument("--timing-iterations", type=int, default=200)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--timing-restarts", type=int, default=4, help="restarts for the batched-restart speed")
    parser.add_argument("--resnet-timing-iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--curve-configs", default="lbfgs-l2,adam-cosine-4800",
                        help=f"settings for the curve parts (lenet-curve, resnet-curve): {', '.join(CURVE_CONFIGS)}")
    parser.add_argument("--curve-cap", type=float, default=60.0, help="CPU seconds per image for the curves")
    parser.add_argument("--curve-every", type=int, default=5, help="iterations between curve points")
    parser.add_argument("--curve-grid", default="2,5,10,15,20,30,45,60", help="seconds the table reports")
    parser.add_argument("--curve-plateau", action=argparse.BooleanOptionalAction, default=True,
                        help="end a run whose objective moved < 0.1%% over 8 reports (converged)")
    parser.add_argument("--curve-png", default=None, help="PNG of the curves (median PSNR / SSIM vs seconds)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    options = {"iterations": args.iterations, "tv": args.tv, "report_every": 100, "device": args.device,
               "optimizer": args.optimizer, "distance": args.distance, "line_search": args.line_search}
    parts = set(args.parts.split(","))
    grid = [float(x) for x in args.curve_grid.split(",")]
    if "lenet-curve" in parts:
        run_curves("LeNet", ModelSpec(name="lenet", num_classes=100, input_shape=(3, 32, 32)),
                   args.curve_configs.split(","), args.images, args.data, args.curve_cap, args.curve_every,
                   args.record, grid, args.curve_png, threads=args.threads, plateau=args.curve_plateau)
    if "resnet-curve" in parts:
        run_curves("ResNet-18 eval", ModelSpec(name="resnet18", num_classes=100, input_shape=(3, 32, 32),
                                               options={"width": str(args.resnet_width)}),
                   args.curve_configs.split(","), args.resnet_images, args.data, args.curve_cap, args.curve_every,
                   args.record, grid, args.curve_png, init=args.resnet_init, mode="eval", threads=args.threads,
                   plateau=args.curve_plateau)
    record = Record(args.record, {**{k: v for k, v in options.items() if k != "report_every"}, "data": args.data})
    lenet = ModelSpec(name="lenet", num_classes=100, input_shape=(3, 32, 32))
    search = "strong Wolfe" if args.line_search else "none"
    if "lenet" in parts:
        print(f"Untrained LeNet 3x32x32 (uniform init), K=100, data {args.data}, {args.optimizer} x {args.iterations} "
              f"iterations (default lr, line search {search}), distance {args.distance}, tv {args.tv:g}, 1 restart, "
              f"{args.threads} thread(s); it/s counts outer iterations.\n")
        print("| model | family | labels | terms | PSNR (dB) | SSIM | images | it/CPU s |")
        print("|---|---|---|---|---|---|---|---|")
    pending = {}
    for family in args.families.split(",") if "lenet" in parts else []:
        rounds = [client_round(lenet, FAMILIES[family], seed, args.data) for seed in range(args.images)]
        updates, truths = [r[0] for r in rounds], [r[1] for r in rounds]
        for source in args.labels.split(","):
            for terms in args.terms.split(","):
                row, note = run_row(updates, truths, source, terms, options, record, ("lenet", family))
                if row is None:
                    pending[source] = note
                    print(f"| LeNet | {family} | {source} | {terms} | pending | | | |", flush=True)
                    continue
                psnr, ssim, n, speed = row
                print(f"| LeNet | {family} | {source} | {terms} | {psnr:.2f} | {ssim:.3f} | {n} | {speed:.1f} |",
                      flush=True)

    if "resnet" in parts:
        resnet = ModelSpec(name="resnet18", num_classes=100, input_shape=(3, 32, 32),
                           options={"width": str(args.resnet_width)})
        res_options = {"iterations": args.resnet_iterations, "tv": args.resnet_tv, "report_every": 100,
                       "device": args.device, "optimizer": args.resnet_optimizer, "distance": args.resnet_distance,
                       "signed": args.resnet_signed, "line_search": args.line_search}
        res_record = Record(args.record, {**{k: v for k, v in res_options.items() if k != "report_every"},
                                          "data": args.data, "init": args.resnet_init})
        print(f"\nResNet-18 width {args.resnet_width}, 3x32x32, K=100, {args.resnet_init} init, label smoothing 0.1, "
              f"{args.resnet_optimizer} x {args.resnet_iterations} (signed {args.resnet_signed}), distance "
              f"{args.resnet_distance}, tv {args.resnet_tv:g}, terms g, 1 restart.\n")
        print("| model | BN mode | labels | terms | PSNR (dB) | SSIM | images | it/CPU s |")
        print("|---|---|---|---|---|---|---|---|")
        name = f"ResNet-18 w{args.resnet_width}"
        for mode in args.resnet_modes.split(","):
            rounds = [client_round(resnet, FAMILIES["smoothing"], seed, args.data, args.resnet_init, mode)
                      for seed in range(args.resnet_images)]
            for source in args.resnet_labels.split(","):
                row, note = run_row([r[0] for r in rounds], [r[1] for r in rounds], source, "g", res_options,
                                    res_record, ("resnet18", args.resnet_width, mode))
                if row is None:
                    pending[source] = note
                    print(f"| {name} | {mode} | {source} | g | pending | | | |", flush=True)
                    continue
                psnr, ssim, n, speed = row
                print(f"| {name} | {mode} | {source} | g | {psnr:.2f} | {ssim:.3f} | {n} | {speed:.2f} |", flush=True)

    if "timing" in parts or "resnet-timing" in parts:
        print(f"\nSpeed, Adam, cosine, terms g, tv {args.tv:g}, median of {args.timing_repeats}, iterations per CPU "
              f"second of one thread (restart-iterations for R > 1; load average {os.getloadavg()[0]:.2f})\n")
        print("| model | iterations | straightforward loop | gitool R=1 | gitool R={0} one by one | gitool R={0} together "
              "| R=1 / loop | together / loop | together / one by one |".format(args.timing_restarts))
        print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    if "timing" in parts:
        update, truth = client_round(lenet, FAMILIES["smoothing"], 0, args.data)
        rows.append(("LeNet 32x32", args.timing_iterations, update, truth))
    if "resnet-timing" in parts:
        resnet = ModelSpec(name="resnet18", num_classes=100, input_shape=(3, 32, 32),
                           options={"width": str(args.resnet_width)})
        update, truth = client_round(resnet, FAMILIES["smoothing"], 0, args.data, args.resnet_init, "eval")
        rows.append((f"ResNet-18 w{args.resnet_width} eval", args.resnet_timing_iterations, update, truth))
    for name, iterations, update, truth in rows:
        r = timing(update, truth, iterations, args.timing_repeats, args.tv, args.timing_restarts)
        print(f"| {name} | {iterations} | {r['naive']:.1f} | {r['gitool']:.1f} | {r['sequential']:.1f} | "
              f"{r['together']:.1f} | {r['gitool'] / r['naive']:.2f}x | {r['together'] / r['naive']:.2f}x | "
              f"{r['together'] / r['sequential']:.2f}x |", flush=True)
    for source, note in pending.items():
        print(f"pending: labels '{source}': {note}")


if __name__ == "__main__":
    main()
