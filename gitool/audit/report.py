"""The audit's report, from the task records: ``summary.json``, ``audit.csv`` and
``report.html``.

- ``summary.json``: what was audited, the plain-language findings, the leakage overall,
  per method, per client, per round and per defence setting, and one row per update;
- ``audit.csv``: one row per update and attack (status, reason, evidence, scores);
- ``report.html``: one self-contained page for a privacy auditor and the data protection
  officer they report to: findings in plain words on top, then the numbers, galleries of
  truth next to reconstruction, count bars, leakage over rounds and against defence
  strength. Pictures are embedded as data URIs; no script, no font or style sheet from
  the network, so it opens from disk anywhere.

Scores exist only where a truth file lay beside an update; elsewhere the page reports the
attacks' own evidence (residuals, convergence, flags). Wall-clock times stay out of all
three files: the same records give the same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable

# What the plain-language findings count as a leak (stated on the page).
LABEL_EXACT = 1e-3  # max |y_hat - y| of a soft label
IMAGE_RECOGNISABLE = 20.0  # PSNR in dB: the picture's content is visible
IMAGE_EXACT = 60.0  # PSNR in dB: RMS error 1/1000 of the pixel range, no visible difference
GALLERY = 24  # reconstructions shown
COUNT_PANELS = 6  # per-update count charts shown
TABLE_ROWS = 300  # per-update rows on the page (all of them are in audit.csv)

CSV_COLUMNS = ("name", "client", "round", "model", "kind", "shape", "num_samples", "family", "dp_clip", "dp_noise",
               "prune", "step", "method", "main", "status", "reason", "output", "consistent", "residual",
               "max_abs_error", "target_accuracy", "eps_error", "mixup_coef_error", "cAcc", "iAcc", "LnAcc",
               "cosine", "relative_error", "psnr", "ssim", "lpips")
RECORD_TIMINGS = ("seconds",)


# --------------------------------------------------------------------------- numbers per update


RAN = ("done", "reused")
TRIED = ("done", "reused", "failed", "error")  # an attack that failed on an update counts as nothing leaked


def main_attack(record: dict[str, Any], step: str, statuses: tuple[str, ...] = RAN) -> dict[str, Any] | None:
    """The step's main attack of an update (what later steps read), if it has one of ``statuses``."""
    for entry in record.get("attacks", []):
        if entry["step"] == step and entry.get("main") and entry["status"] in statuses:
            return entry
    return None


def leakage_of(record: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one update (None where not measured). Where a truth lay
    beside the update, an attack that failed counts as having recovered nothing."""
    truth = record.get("truth") is not None
    labels, recon = main_attack(record, "labels", TRIED), main_attack(record, "reconstruct", TRIED)
    features = main_attack(record, "features")
    label_scores = (labels or {}).get("scores") or {}
    recon_scores = (recon or {}).get("scores") or {}
    labels_failed = truth and labels is not None and labels["status"] not in RAN
    recon_failed = truth and recon is not None and recon["status"] not in RAN
    per_sample = record.get("num_samples") == 1
    psnr = recon_scores.get("psnr")
    return {
        "label_method": (labels or {}).get("method"),
        "label_accuracy": 0.0 if labels_failed and per_sample else
        label_scores.get("target_accuracy") if per_sample else None,
        "soft_label_error": label_scores.get("max_abs_error") if per_sample else None,
        "cAcc": label_scores.get("cAcc") if not per_sample else None,
        "iAcc": 0.0 if labels_failed and not per_sample else label_scores.get("iAcc") if not per_sample else None,
        "feature_cosine": ((features or {}).get("scores") or {}).get("cosine"),
        "image_method": (recon or {}).get("method"),
        "psnr": psnr,
        "ssim": recon_scores.get("ssim"),
        "lpips": recon_scores.get("lpips"),
        "recognisable": False if recon_failed else None if psnr is None else psnr >= IMAGE_RECOGNISABLE,
        "exact_image": False if recon_failed else None if psnr is None else psnr >= IMAGE_EXACT,
        "labels_consistent": ((labels or {}).get("evidence") or {}).get("consistent"),
        "image_consistent": ((recon or {}).get("evidence") or {}).get("consistent"),
    }


def _mean(values: Iterable[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(float(v))]
    return sum(numbers) / len(numbers) if numbers else None


def _median(values: Iterable[Any]) -> float | None:
    numbers = sorted(float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(float(v)))
    if not numbers:
        return None
    middle = len(numbers) // 2
    return numbers[middle] if len(numbers) % 2 else (numbers[middle - 1] + numbers[middle]) / 2


def _share(values: Iterable[Any]) -> float | None:
    flags = [bool(v) for v in values if v is not None]
    return sum(flags) / len(flags) if flags else None


def aggregate(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Leakage of a group of updates: means of what was scored, shares of what leaked,
    and where no truth was at hand the share the attacks' own checks confirm."""
    rows = [leakage_of(r) for r in records if r.get("status") == "ok"]
    return {
        "updates": len(records),
        "unreadable": sum(1 for r in records if r.get("status") != "ok"),
        "labels_scored": sum(1 for r in rows if r["label_accuracy"] is not None),
        "label_accuracy": _mean(r["label_accuracy"] for r in rows),
        "soft_label_error": _mean(r["soft_label_error"] for r in rows),
        "labels_exact": _share(r["soft_label_error"] <= LABEL_EXACT for r in rows if r["soft_label_error"] is not None),
        "counts_scored": sum(1 for r in rows if r["iAcc"] is not None),
        "cAcc": _mean(r["cAcc"] for r in rows),
        "iAcc": _mean(r["iAcc"] for r in rows),
        "feature_cosine": _mean(r["feature_cosine"] for r in rows),
        "images_scored": sum(1 for r in rows if r["recognisable"] is not None),
        "psnr": _mean(r["psnr"] for r in rows),
        "psnr_median": _median(r["psnr"] for r in rows),
        "ssim": _mean(r["ssim"] for r in rows),
        "lpips": _mean(r["lpips"] for r in rows),
        "images_recognisable": _share(r["recognisable"] for r in rows),
        "images_exact": _share(r["exact_image"] for r in rows),
        "labels_consistent": _share(r["labels_consistent"] for r in rows),
        "images_consistent": _share(r["image_consistent"] for r in rows),
    }


def by_method(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step and method (main and further ones): how often it ran, and its mean scores."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        for entry in record.get("attacks", []):
            groups[(entry["step"], entry["method"])].append(entry)
    rows = []
    for (step, method), entries in sorted(groups.items()):
        statuses = Counter(e["status"] for e in entries)
        scores = [e.get("scores") or {} for e in entries]
        keys = sorted({k for s in scores for k, v in s.items() if isinstance(v, (int, float))})
        rows.append({"step": step, "method": method, "status": dict(sorted(statuses.items())),
                     "scored": sum(1 for s in scores if s),
                     "means": {k: _mean(s.get(k) for s in scores) for k in keys},
                     "consistent": _share((e.get("evidence") or {}).get("consistent") for e in entries)})
    return rows


def defence_key(record: dict[str, Any]) -> str:
    defence = record.get("defence")
    if defence is None:
        return "unknown"
    parts = []
    if defence.get("dp_clip") is not None:
        parts.append(f"clip {defence['dp_clip']:g}")
    if defence.get("dp_noise"):
        parts.append(f"noise {defence['dp_noise']:g}")
    if defence.get("prune"):
        parts.append(f"prune {defence['prune']:g}")
    return ", ".join(parts) or "none"


def grouped(records: list[dict[str, Any]], key) -> list[dict[str, Any]]:
    groups: dict[Any, list[dict]] = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return [{"group": name, **aggregate(members)} for name, members in
            sorted(groups.items(), key=lambda item: _sort_key(item[0]))]


def _sort_key(value: Any) -> tuple:
    """Numbers (and digit strings) in numeric order, then other names, then None."""
    if value is None:
        return (2, 0, "")
    if isinstance(value, (int, float)):
        return (0, value, "")
    text = str(value)
    return (0, int(text), text) if text.isdigit() else (1, 0, text)


def defence_series(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """For each defence knob that differs between updates (DP noise, clipping, pruning):
    the leakage at each of its values, "none" first."""
    known = [r for r in records if r.get("status") == "ok" and r.get("defence") is not None]
    series = {}
    for knob in ("dp_noise", "dp_clip", "prune"):
        values = {r["defence"].get(knob) or None for r in known}  # no noise, no pruning: none, as no clipping
        if len(values) < 2:
            continue
        rows = []
        for value in sorted(values, key=lambda v: (v is not None, v or 0.0)):
            members = [r for r in known if (r["defence"].get(knob) or None) == value]
            rows.append({"value": value, "value_text": "none" if value is None else f"{value:g}",
                         **aggregate(members)})
        series[knob] = rows
    return series


# --------------------------------------------------------------------------- findings in words


def findings(records: list[dict[str, Any]], total: int, interrupted: bool) -> dict[str, Any]:
    """The risk level and a few sentences a data protection officer can read."""
    overall = aggregate(records)
    ok = [r for r in records if r.get("status") == "ok"]
    clients = {r.get("client") for r in ok}
    rounds = {r.get("round") for r in ok if r.get("round") is not None}
    sentences = []
    scope = f"gitool audited {len(records)} client update{'s' if len(records) != 1 else ''}"
    if clients:
        scope += f" from {len(clients)} client{'s' if len(clients) != 1 else ''}"
    if rounds:
        scope += f" over {len(rounds)} training round{'s' if len(rounds) != 1 else ''}"
    scope += ", playing an honest-but-curious server that sees only what each client sends."
    if interrupted:
        scope += f" The audit was stopped early: {len(records)} of {total} updates are covered."
    sentences.append(scope)
    if overall["unreadable"]:
        sentences.append(f"{overall['unreadable']} update(s) could not be read or were lost; they are listed below.")
    leaks_images = leaks_labels = False
    if overall["labels_scored"]:
        right = round(overall["label_accuracy"] * overall["labels_scored"])
        sentences.append(f"Training labels: for {right} of {overall['labels_scored']} single-sample updates the server "
                         f"recovered the label the client trained on (mean error of the recovered soft label "
                         f"{fmt_number(overall['soft_label_error'])}).")
        leaks_labels = overall["label_accuracy"] >= 0.5
    if overall["counts_scored"]:
        sentences.append(f"Class counts: for {overall['counts_scored']} updates of batches or several local steps the "
                         f"server counted how many samples of each class the client used; "
                         f"{fmt_percent(overall['iAcc'])} of the samples' labels were counted right (iAcc) and the classes "
                         f"present were named right in {fmt_percent(overall['cAcc'])} of cases (cAcc).")
        leaks_labels = leaks_labels or (overall["iAcc"] or 0) >= 0.5
    if overall["images_scored"]:
        recognisable = round(overall["images_recognisable"] * overall["images_scored"])
        exact = round(overall["images_exact"] * overall["images_scored"])
        sentences.append(f"Private images: the server tried to rebuild the training images of "
                         f"{overall['images_scored']} update(s) with a truth file; {recognisable} came out recognisable "
                         f"(PSNR >= {IMAGE_RECOGNISABLE:g} dB) and {exact} practically identical to the originals "
                         f"(PSNR >= {IMAGE_EXACT:g} dB); median PSNR {fmt_number(overall['psnr_median'], 1)} dB.")
        leaks_images = recognisable > 0
    unscored = [r for r in ok if not r.get("truth")]
    if unscored:
        own = [leakage_of(r) for r in unscored]
        labels_ok = sum(1 for r in own if r["labels_consistent"])
        images_ok = sum(1 for r in own if r["image_consistent"])
        sentences.append(f"{len(unscored)} update(s) had no truth file beside them, so only the attacks' own checks "
                         f"speak for them: the recovered labels of {labels_ok} and the rebuilt images of {images_ok} "
                         "reproduce what the client sent, to round-off (strong evidence that they are the client's "
                         "real labels and images).")
        leaks_images = leaks_images or images_ok > 0
        leaks_labels = leaks_labels or labels_ok > 0
    series = defence_series(records)
    for knob, rows in series.items():
        sentences.append(_defence_sentence(knob, rows))
    if leaks_images:
        level, headline = "high", "High risk: client updates reveal private training images."
    elif leaks_labels:
        level, headline = "elevated", "Elevated risk: client updates reveal which labels clients trained on."
    else:
        level, headline = "low", "Low risk: the attacks run here recovered little from these updates."
    return {"risk": level, "headline": headline, "sentences": sentences}


KNOB_WORDS = {"dp_noise": "DP noise multiplier", "dp_clip": "DP clipping norm", "prune": "pruned fraction"}


def _defence_sentence(knob: str, rows: list[dict[str, Any]]) -> str:
    metric = comparable_metric(rows)
    if metric is None:
        return (f"Defence: updates with different {KNOB_WORDS[knob]}s were attacked in different ways (for example "
                "only batches were defended), so their leakage cannot be compared here; see the table.")
    key, unit, label = metric
    parts = [f"{row['value_text']}: {_metric_text(row[key], unit)}" for row in rows]
    return f"Defence: {label} by {KNOB_WORDS[knob]}: {'; '.join(parts)}."


# Leakage measures that compare defence settings, in order of preference: the first that
# every setting has is used.
COMPARABLE = (("psnr", " dB", "image PSNR"), ("images_recognisable", "%", "images recognisable"),
              ("label_accuracy", "%", "labels recovered"), ("iAcc", "%", "count accuracy iAcc"),
              ("images_consistent", "%", "reconstructions the attack confirms"),
              ("labels_consistent", "%", "labels the attack confirms"))


def comparable_metric(rows: list[dict[str, Any]]) -> tuple[str, str, str] | None:
    for key, unit, label in COMPARABLE:
        if all(row.get(key) is not None for row in rows):
            return key, unit, label
    return None


def _metric_text(value: Any, unit: str) -> str:
    if value is None:
        return "-"
    return fmt_percent(value) if unit == "%" else f"{value:.1f}{unit}"


def fmt_percent(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def fmt_number(value: Any, digits: int | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if digits is not None:
        return f"{value:.{digits}f}"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.1e}"
    return f"{value:.4g}"


# --------------------------------------------------------------------------- the files


def update_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One compact row per update: who, what, and its headline leakage."""
    rows = []
    for record in records:
        row = {key: record.get(key) for key in ("name", "client", "round", "status", "model", "kind", "shape",
                                                 "num_samples", "family")}
        row["defence"] = defence_key(record) if record.get("status") == "ok" else None
        row["truth"] = record.get("truth") is not None
        if record.get("status") == "ok":
            row.update(leakage_of(record))
        else:
            row["error"] = record.get("error")
        rows.append(row)
    return rows


def csv_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for record in records:
        defence = record.get("defence") or {}
        base = {key: record.get(key) for key in ("name", "client", "round", "model", "kind", "shape", "num_samples",
                                                  "family")}
        base.update(dp_clip=defence.get("dp_clip"), dp_noise=defence.get("dp_noise"), prune=defence.get("prune"))
        if record.get("status") != "ok":
            rows.append({**base, "status": record.get("status"), "reason": record.get("error")})
            continue
        for entry in record["attacks"]:
            evidence, scores = entry.get("evidence") or {}, entry.get("scores") or {}
            row = {**base, "step": entry["step"], "method": entry["method"], "main": entry.get("main"),
                   "status": entry["status"], "reason": entry.get("reason"), "output": entry.get("output"),
                   "consistent": evidence.get("consistent"), "residual": evidence.get("residual",
                                                                                      evidence.get("max_layer_residual"))}
            row.update({key: scores.get(key) for key in CSV_COLUMNS if key in scores})
            rows.append(row)
    return rows


def write_csv(records: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in csv_rows(records):
        writer.writerow({key: _csv_value(row.get(key)) for key in CSV_COLUMNS})
    return buffer.getvalue().encode()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return value


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in RECORD_TIMINGS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def build_summary(records: list[dict[str, Any]], *, total: int, interrupted: bool, settings,
                  context: dict[str, Any]) -> dict[str, Any]:
    from gitool import __version__

    records = _without_timings(records)
    return {
        "gitool": __version__,
        "audit": {"inputs": [str(i) for i in context.get("inputs", [])], "out_dir": settings.out_dir,
                  "methods": context.get("methods", "auto"), "options": settings.options,
                  "lpips": settings.lpips_weights is not None, "updates": total, "audited": len(records),
                  "interrupted": interrupted},
        "thresholds": {"label_exact_max_abs_error": LABEL_EXACT, "image_recognisable_psnr": IMAGE_RECOGNISABLE,
                       "image_exact_psnr": IMAGE_EXACT},
        "findings": findings(records, total, interrupted),
        "overall": aggregate(records),
        "methods": by_method(records),
        "per_client": grouped(records, lambda r: r.get("client")),
        "per_round": grouped([r for r in records if r.get("round") is not None], lambda r: r.get("round")),
        "per_defence": grouped([r for r in records if r.get("status") == "ok"], defence_key),
        "defence_series": defence_series(records),
        "not_attacked": not_attacked(records),
        "updates": update_rows(records),
    }


def not_attacked(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Why attacks did not run or did not finish, counted by step, method, status and reason."""
    counts: Counter = Counter()
    for record in records:
        if record.get("status") != "ok":
            counts[("read", "-", record.get("status"), _first_line(record.get("error")))] += 1
        for entry in record.get("attacks", []):
            if entry["status"] not in ("done", "reused"):
                counts[(entry["step"], entry["method"], entry["status"], _reason(entry.get("reason")))] += 1
    return [{"step": s, "method": m, "status": st, "reason": why, "updates": n}
            for (s, m, st, why), n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def _first_line(text: Any) -> str:
    return str(text or "").splitlines()[0][:300] if text else ""


def _reason(text: Any) -> str:
    """A reason without the file path, so that the same reason counts once."""
    line = _first_line(text)
    return " ".join(word for word in line.split() if not word.endswith(".safetensors") and "/" not in word)


def write_report(records: list[dict[str, Any]], out_dir: Path, *, total: int, interrupted: bool, settings,
                 context: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Write summary.json, audit.csv and report.html into ``out_dir``."""
    from gitool.files import atomic_write_bytes

    summary = build_summary(records, total=total, interrupted=interrupted, settings=settings, context=context)
    written = {}
    for name, data in (("summary.json", json.dumps(summary, indent=1, sort_keys=False, allow_nan=False,
                                                   default=str).encode() + b"\n"),
                       ("audit.csv", write_csv(records)),
                       ("report.html", render_html(summary, records, settings).encode())):
        atomic_write_bytes(out_dir / name, data)
        written[name] = str(out_dir / name)
    return summary, written


# --------------------------------------------------------------------------- the page


def render_html(summary: dict[str, Any], records: list[dict[str, Any]], settings) -> str:
    from gitool.audit.report_html import page

    return page(summary, records, settings)
