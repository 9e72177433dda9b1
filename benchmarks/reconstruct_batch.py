"""Benchmark: a whole mini-batch from a one-step gradient alone (issue 15, items 1-3).

Each batch runs the server's chain with the step functions the CLI uses
(`gitool.steps`): ``labels --per-sample``, ``features --labels``, ``reconstruct --method
fc|conv``; only then is the truth read (``score``, Hungarian matching). Float64, untrained
models, photographs (crops of scikit-image's photographs as ``--data photos`` makes them;
K = 20 so that B = 16 <= K - 1: class c is photograph c mod 10, other crops). Per row:

- ``exact``: samples reconstructed at PSNR >= 100 dB, over all samples of the row;
- ``exact where rank holds``: the same over the batches not refused for a rank condition
  (the classifier gradient's rank below B, or a layer's stacked system short of
  equations: docs/analytic.md conditions 3 and "rank(G) = B"); a batch refused because no
  label set fits counts against it, unless the layers' rank condition fails for it as
  well (asked of the truth's labels and features, for this column only);
- ``refused``: batches the chain refused (its one-line error counted by condition);
- ``wrong``: samples below 100 dB in batches that were NOT refused (silent failures);
- ``label acc``: per-sample labels, target class right after matching, over all samples
  of the row (a batch whose labels were refused counts as wrong; one refused later by
  the reconstruction keeps its labels); ``iLRG iAcc``: iLRG's count accuracy on
  the same updates (needs the bias; "-" without one);
- ``s/batch``: wall time of labels + features + reconstruct per batch (capture and
  scoring not timed), median over the row's batches.

    python benchmarks/reconstruct_batch.py                       # every row, 20 batches each
    python benchmarks/reconstruct_batch.py --batches 5 --rows fcn4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

K = 20
SHAPE = (3, 32, 32)
FCN = {"widths": "4096,1024,256"}
# name, model, activation, last bias, model options, method, B, labels (distinct | repeat | smoothing | mixup)
ROWS = [
    *[(f"FCN-4 bias B={b}", "fcn4", "relu", True, {**FCN, "hidden_bias": "true"}, "fc", b, "distinct")
      for b in (2, 4, 8, 16)],
    *[(f"FCN-4 no bias B={b}", "fcn4", "relu", False, {**FCN, "hidden_bias": "false"}, "fc", b, "distinct")
      for b in (2, 4, 8, 16)],
    *[(f"rconv-lenet LeakyReLU {size}x{size} B={b}", "rconv-lenet", "leakyrelu", True, {}, "conv", b, "distinct",
       size) for size in (8, 16, 32) for b in (2, 4, 8)],
    *[(f"rconv-lenet all-ReLU 77,22,3,3 {size}x{size} B={b}", "rconv-lenet", "relu", True,
       {"channels": "77,22,3,3"}, "conv", b, "distinct", size) for size in (8, 16, 32) for b in (2, 4, 8)],
    ("FCN-4 bias B=4, one class twice", "fcn4", "relu", True, {**FCN, "hidden_bias": "true"}, "fc", 4, "repeat"),
    ("FCN-4 no bias B=4, one class twice", "fcn4", "relu", False, {**FCN, "hidden_bias": "false"}, "fc", 4,
     "repeat"),
    ("FCN-4 bias B=8, classes drawn at random", "fcn4", "relu", True, {**FCN, "hidden_bias": "true"}, "fc", 8,
     "random"),
    ("FCN-4 bias B=4, label smoothing 0.1", "fcn4", "relu", True, {**FCN, "hidden_bias": "true"}, "fc", 4,
     "smoothing"),
    ("FCN-4 no bias B=4, label smoothing 0.1", "fcn4", "relu", False, {**FCN, "hidden_bias": "false"}, "fc", 4,
     "smoothing"),
    ("FCN-4 bias B=4, mixup coef 0.7", "fcn4", "relu", True, {**FCN, "hidden_bias": "true"}, "fc", 4, "mixup"),
]


def photo_source(seed: int, shape=SHAPE):
    """``--data photos`` with K = 20 classes: item i has class i mod 20 and is a crop of
    photograph (i mod 20) mod 10 (the ten photographs, each under two class labels)."""
    import numpy as np

    from gitool.data import PhotoSource, _photographs

    class TwentyClassPhotos(PhotoSource):
        def __init__(self):
            super().__init__(shape, 50, seed, "photos(K=20)")
            self.num_classes = K
            self.class_names = [f"{name}-{half}" for half in "ab" for name in self.class_names]
            self.labels = np.arange(len(self.labels), dtype=np.int64) % K

        def _load(self, indices):
            photos = _photographs(self.folder)
            import torch

            from gitool.data import convert_channels

            crops = torch.cat([self._crop(photos[int(self.labels[i]) % 10], i, shape[1], shape[2]) for i in indices])
            return convert_channels(crops, shape[0])

    return TwentyClassPhotos()


RANK_REFUSALS = ("labels: rank < B", "reconstruct: a layer's rank condition fails")


def refusal_kind(message: str) -> str:
    """A short name for the condition a refusal names."""
    for needle, name in (("rank deficient", "labels: rank < B"), ("> B", "labels: rank > B"),
                         ("K - 1", "labels: B > K - 1"), ("no hard label set", "labels: no hard label set fits"),
                         ("no smoothing label set", "labels: no smoothed label set fits"),
                         ("cannot recover its input", "reconstruct: a layer's rank condition fails")):
        if needle in message:
            return name
    return message[:60]


def classes_for(kind: str, batch: int, seed: int) -> list[int] | None:
    import random

    rng = random.Random(seed)
    if kind == "random":
        return None  # capture draws them (repeats happen)
    chosen = rng.sample(range(K), batch)
    if kind == "repeat":
        chosen[1] = chosen[0]
    return chosen


def run_batch(row, seed: int) -> dict:
    from gitool.capture import CaptureConfig, SampleChoice, capture
    from gitool.errors import GitoolError
    from gitool.files import InputSpec, LossSpec, TrainingSpec
    from gitool.models import ModelSpec
    from gitool.steps import feature_step, label_step, reconstruct_step, score_step

    name, model, activation, last_bias, options, method, batch, kind, *size = row
    shape = (3, size[0], size[0]) if size else SHAPE
    spec = ModelSpec(model, num_classes=K, input_shape=shape, activation=activation, last_bias=last_bias,
                     options=options)
    loss = {"smoothing": LossSpec(family="smoothing", label_smoothing=0.1),
            "mixup": LossSpec(family="mixup", mixup_coef=0.7)}.get(kind, LossSpec())
    config = CaptureConfig(input=InputSpec(shape=shape), training=TrainingSpec(dtype="float64", batch_size=batch),
                           loss=loss, choice=SampleChoice(classes=classes_for(kind, batch, seed)), seed=seed,
                           init="default" if model == "fcn4" else "uniform")
    update, truth = capture(photo_source(seed, shape), spec, config)
    out: dict = {"samples": batch, "label_right": 0, "exact": 0}
    started = time.perf_counter()
    try:
        labels, _ = label_step(update, "per-sample", {})
    except GitoolError as exc:
        out["seconds"] = time.perf_counter() - started
        out["refused"], out["error"] = refusal_kind(str(exc)), str(exc)
        labels = None
    if labels is not None:
        try:
            features = feature_step(update, labels, {})
            recon, _ = reconstruct_step(update, labels, features, method, {})
            out["seconds"] = time.perf_counter() - started
        except GitoolError as exc:
            out["seconds"] = time.perf_counter() - started
            out["refused"], out["error"] = refusal_kind(str(exc)), str(exc)
            recon = None
        out["label_right"] = round(score_step(labels, truth)["target_accuracy"] * batch)
        if recon is not None:
            images = score_step(recon, truth)
            out["exact"] = sum(p >= 100 for p in images["psnr_per_image"])
            out["min_psnr"] = min(images["psnr_per_image"])
    if out.get("refused") and out["refused"] not in RANK_REFUSALS:
        # Would the layers' rank condition have held? Asked of the truth's labels and features
        # (an oracle for this classification only; the attack above never saw them).
        from gitool.files import new_result

        oracle_labels = new_result("labels", {"labels": truth.labels}, method="oracle", update=update)
        oracle_features = new_result("features", {"features": truth.features}, method="oracle", update=update)
        try:
            reconstruct_step(update, oracle_labels, oracle_features, method, {})
        except GitoolError as exc:
            if refusal_kind(str(exc)) in RANK_REFUSALS:
                out["rank_fails_anyway"] = True
    if last_bias:
        counts, _ = label_step(update, "ilrg", {})
        out["ilrg_iacc"] = score_step(counts, truth)["iAcc"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=20, help="batches per row (seeds 1..N)")
    parser.add_argument("--rows", default="", help="only rows whose name contains this text")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"float64, untrained models, photos 3x32x32 unless the row says, K = {K}, {args.batches} batches per row, "
          f"{args.threads} thread(s)\n")
    print("| row | samples | exact (>= 100 dB) | exact where rank holds | refused batches | wrong, not refused "
          "| label acc (per-sample) | iLRG iAcc | s/batch (median) |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for row in ROWS:
        if args.rows and args.rows not in row[0]:
            continue
        results = []
        for seed in range(1, args.batches + 1):
            result = run_batch(row, seed)
            results.append(result)
            if args.verbose:
                print(f"  {row[0]} seed {seed}: {result}", file=sys.stderr, flush=True)
        samples = sum(r["samples"] for r in results)
        exact = sum(r["exact"] for r in results)
        refused = Counter(r["refused"] for r in results if "refused" in r)
        wrong = sum(r["samples"] - r["exact"] for r in results if "refused" not in r)
        label_acc = sum(r["label_right"] for r in results) / samples
        ilrg = [r["ilrg_iacc"] for r in results if "ilrg_iacc" in r]
        seconds = statistics.median(r["seconds"] for r in results)
        refused_text = "; ".join(f"{n} x {why}" for why, n in refused.items()) or "0"
        holds = [r for r in results if r.get("refused") not in RANK_REFUSALS and not r.get("rank_fails_anyway")]
        held = sum(r["samples"] for r in holds)
        where = f"{sum(r['exact'] for r in holds)}/{held} ({100 * sum(r['exact'] for r in holds) / held:.1f}%)" \
            if held else "- (no batch)"
        ilrg_text = f"{statistics.mean(ilrg):.3f}" if ilrg else "-"
        print(f"| {row[0]} | {samples} | {exact} ({100 * exact / samples:.1f}%) | {where} | {refused_text} | {wrong} | "
              f"{label_acc:.3f} | {ilrg_text} | {seconds:.2f} |", flush=True)

if __name__ == "__main__":
    main()
