"""``report.html``: the audit summary as one page that opens from disk anywhere.

Everything is inline: the style sheet, and every picture as a ``data:image/png`` URI
(charts drawn with matplotlib's Agg backend, image strips with PIL). No script runs and
nothing is fetched. The page reads top-down for a data protection officer: the risk and
the findings in words, then the evidence.
"""

from __future__ import annotations

import base64
import html
from typing import Any, Callable, Sequence

from gitool.audit.report import (COUNT_PANELS, GALLERY, IMAGE_EXACT, IMAGE_RECOGNISABLE, KNOB_WORDS, LABEL_EXACT,
                                 TABLE_ROWS, fmt_number, fmt_percent, comparable_metric, main_attack)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0;
       color: #1d2330; background: #f6f7f9; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.4em; } h2 { font-size: 1.25em; margin-top: 2em;
     border-bottom: 2px solid #e3e6eb; padding-bottom: 4px; } h3 { font-size: 1.05em; margin-top: 1.4em; }
.risk { border-radius: 8px; padding: 14px 18px; margin: 12px 0 18px; font-size: 1.1em; font-weight: 600; }
.risk.high { background: #fde8e8; border-left: 6px solid #c81e1e; }
.risk.elevated { background: #fdf6e3; border-left: 6px solid #c27c0e; }
.risk.low { background: #e7f6ec; border-left: 6px solid #1f7a3f; }
ul.findings li { margin: 0.35em 0; }
table.data { border-collapse: collapse; margin: 10px 0; font-size: 0.88em; width: 100%; }
table.data th, table.data td { border: 1px solid #dde1e7; padding: 4px 7px; text-align: right; vertical-align: top; }
table.data th { background: #f0f2f5; } table.data td.text, table.data th.text { text-align: left; }
table.data tr:nth-child(even) td { background: #fafbfc; }
.muted { color: #5b6372; font-size: 0.9em; }
.gallery { display: flex; flex-wrap: wrap; gap: 14px; }
figure.card { margin: 0; padding: 8px; border: 1px solid #dde1e7; border-radius: 6px; background: #fcfcfd;
              max-width: 340px; }
figure.card img { display: block; image-rendering: pixelated; max-width: 100%; }
figure.card figcaption { font-size: 0.8em; margin-top: 4px; }
.strip-label { font-size: 0.75em; color: #5b6372; margin: 4px 0 1px; }
img.chart { max-width: 100%; display: block; margin: 8px 0; }
.panels { display: flex; flex-wrap: wrap; gap: 8px; } .panels img { max-width: 340px; }
dl.glossary dt { font-weight: 600; margin-top: 0.6em; } dl.glossary dd { margin-left: 1.2em; }
"""


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def img(data: bytes, alt: str, cls: str = "") -> str:
    css_class = f' class="{cls}"' if cls else ""
    return f'<img src="{png_uri(data)}" alt="{esc(alt)}"{css_class}>'


Column = tuple[str, str, Callable[[Any], str]]  # key, title, formatter


def table(columns: Sequence[Column], rows: Sequence[dict[str, Any]], caption: str | None = None) -> str:
    text_keys = {"group", "name", "client", "method", "step", "status", "reason", "defence", "model", "shape", "kind",
                 "family", "label_method", "image_method", "value_text"}
    head = "".join(f'<th class="{"text" if key in text_keys else ""}">{esc(title)}</th>'
                   for key, title, _ in columns)
    body = []
    for row in rows:
        cells = "".join(f'<td class="{"text" if key in text_keys else ""}">{fmt(row.get(key))}</td>'
                        for key, _, fmt in columns)
        body.append(f"<tr>{cells}</tr>")
    cap = f"<caption class=\"muted\">{esc(caption)}</caption>" if caption else ""
    return f'<table class="data">{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def f_text(value: Any) -> str:
    return esc("-" if value is None or value == "" else value)


def f_num(value: Any) -> str:
    return esc(fmt_number(value))


def f_pct(value: Any) -> str:
    return esc(fmt_percent(value))


def f_db(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def f_flag(value: Any) -> str:
    return {True: "yes", False: "no"}.get(value, "-")


LEAKAGE_COLUMNS: list[Column] = [
    ("updates", "updates", f_num), ("label_accuracy", "labels recovered", f_pct),
    ("soft_label_error", "soft-label error", f_num), ("cAcc", "cAcc", f_pct), ("iAcc", "iAcc", f_pct),
    ("psnr", "PSNR dB", f_db), ("ssim", "SSIM", f_num), ("lpips", "LPIPS", f_num),
    ("images_recognisable", "images recognisable", f_pct),
    ("labels_consistent", "labels self-checked", f_pct), ("images_consistent", "images self-checked", f_pct),
]


# --------------------------------------------------------------------------- charts


def _figure(width: float = 6.4, height: float = 2.9):
    from gitool.plotting import new_figure

    figure, axis = new_figure(width, height)
    axis.grid(True, alpha=0.3)
    return figure, axis


def _png(figure) -> bytes:
    from gitool.plotting import figure_png

    figure.tight_layout()
    return figure_png(figure)


def line_chart(x: Sequence[Any], series: dict[str, Sequence[Any]], xlabel: str, ylabel: str, title: str,
               percent: bool = False) -> bytes:
    figure, axis = _figure()
    positions = list(range(len(x)))
    for name, values in series.items():
        points = [(p, v * (100 if percent else 1)) for p, v in zip(positions, values) if v is not None]
        if points:
            axis.plot([p for p, _ in points], [v for _, v in points], marker="o", label=name)
    axis.set_xticks(positions)
    axis.set_xticklabels([fmt_number(v) if isinstance(v, float) else str(v) for v in x], fontsize=8,
                         rotation=0 if len(x) <= 12 else 60)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    if percent:
        axis.set_ylim(-3, 103)
    axis.set_title(title, fontsize=10)
    if series:
        axis.legend(fontsize=8, loc="best")
    return _png(figure)


def count_chart(true: Sequence[int], recovered: Sequence[int], title: str, width: float = 6.4) -> bytes:
    import numpy as np

    figure, axis = _figure(width, 2.6)
    classes = np.arange(len(true))
    axis.bar(classes - 0.2, true, width=0.4, label="true", color="#4a6fa5")
    axis.bar(classes + 0.2, recovered, width=0.4, label="recovered", color="#d9822b")
    axis.set_xticks(classes)
    axis.set_xticklabels([str(c) for c in classes], fontsize=7)
    axis.set_xlabel("class")
    axis.set_ylabel("samples")
    axis.set_title(title, fontsize=9)
    axis.legend(fontsize=7)
    return _png(figure)


# --------------------------------------------------------------------------- sections


def page(summary: dict[str, Any], records: list[dict[str, Any]], settings) -> str:
    sections = [_top(summary), _scope(summary, records), _labels(summary, records), _images(summary, records),
                _rounds(summary), _clients(summary), _defence(summary), _updates(summary), _problems(summary),
                _glossary(summary)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>gitool audit: what client updates leak</title>"
            f"<style>{CSS}</style></head><body><main>{''.join(s for s in sections if s)}</main></body></html>\n")


def _top(summary: dict[str, Any]) -> str:
    found = summary["findings"]
    items = "".join(f"<li>{esc(sentence)}</li>" for sentence in found["sentences"])
    audit = summary["audit"]
    return (f'<h1>Privacy audit of federated-learning client updates</h1>'
            f'<p class="muted">gitool {esc(summary["gitool"])}; methods: {esc(audit["methods"])}; '
            f'{audit["audited"]} of {audit["updates"]} updates{" (stopped early)" if audit["interrupted"] else ""}.</p>'
            f'<div class="risk {esc(found["risk"])}" id="risk">{esc(found["headline"])}</div>'
            f'<h2 id="summary">Summary in plain words</h2><ul class="findings">{items}</ul>')


def _scope(summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    ok = [r for r in records if r.get("status") == "ok"]
    by_model: dict[tuple, int] = {}
    for record in ok:
        key = (record.get("model"), record.get("shape"), record.get("family") or "unknown")
        by_model[key] = by_model.get(key, 0) + 1
    rows = [{"model": m, "shape": {"single": "one sample, one step", "batch": "a batch, one step",
                                   "multistep": "several local steps"}.get(s, s), "family": f, "updates": n}
            for (m, s, f), n in sorted(by_model.items(), key=lambda item: tuple(map(str, item[0])))]
    with_truth = sum(1 for r in ok if r.get("truth"))
    methods = [{"step": m["step"], "method": m["method"], "ran": sum(v for k, v in m["status"].items()
                                                                      if k in ("done", "reused")),
                "not": sum(v for k, v in m["status"].items() if k not in ("done", "reused"))}
               for m in summary["methods"]]
    return ("<h2 id=\"scope\">What was audited</h2>"
            + table([("model", "model", f_text), ("shape", "what the client sent", f_text),
                     ("family", "label kind", f_text), ("updates", "updates", f_num)], rows)
            + f"<p>{with_truth} of {len(ok)} readable updates had a truth file beside them (the client's real data, "
              "from <code>gitool capture</code> or the client's own records); only those are scored against "
              "reality.</p>"
            + table([("step", "step", f_text), ("method", "method", f_text), ("ran", "updates attacked", f_num),
                     ("not", "not applicable / failed", f_num)], methods, caption="attacks run"))


def _labels(summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    parts = ["<h2 id=\"labels\">Label leakage</h2>"]
    rows = [m for m in summary["methods"] if m["step"] == "labels" and _ran(m)]
    if rows:
        flat = [{"method": m["method"], "scored": m["scored"], **{k: m["means"].get(k) for k in
                                                                  ("target_accuracy", "max_abs_error", "cAcc", "iAcc",
                                                                   "LnAcc")}, "consistent": m["consistent"]}
                for m in rows]
        parts.append(table([("method", "method", f_text), ("scored", "scored", f_num),
                            ("target_accuracy", "label right", f_pct), ("max_abs_error", "soft-label error", f_num),
                            ("cAcc", "cAcc", f_pct), ("iAcc", "iAcc", f_pct), ("LnAcc", "LnAcc", f_pct),
                            ("consistent", "self-checked", f_pct)], flat, caption="per method"))
    counted = [r for r in records if r.get("true_counts") and _recovered_counts(r) is not None]
    if counted:
        k = len(counted[0]["true_counts"])
        same_k = [r for r in counted if len(r["true_counts"]) == k]
        true_sum = [sum(r["true_counts"][j] for r in same_k) for j in range(k)]
        rec_sum = [sum(_recovered_counts(r)[j] for r in same_k) for j in range(k)]
        parts.append("<h3>Samples per class, true against recovered</h3>"
                     + img(count_chart(true_sum, rec_sum, f"all {len(same_k)} counted updates together"),
                           "class counts of all counted updates", "chart"))
        ranked = sorted(same_k, key=lambda r: (_iacc(r), r["name"]))
        step = max(1, len(ranked) // COUNT_PANELS)
        chosen = ranked[::step][:COUNT_PANELS]
        panels = "".join(img(count_chart(r["true_counts"], _recovered_counts(r),
                                         f"{r['name']} ({main_attack(r, 'labels')['method']}, "
                                         f"iAcc {fmt_percent(_iacc(r))})", width=4.2), f"class counts of {r['name']}")
                         for r in chosen)
        parts.append(f"<p class=\"muted\">{len(chosen)} updates from the least to the most accurate count:</p>"
                     f"<div class=\"panels\">{panels}</div>")
    elif not rows:
        parts.append("<p>No label attack ran.</p>")
    return "".join(parts)


def _ran(method: dict[str, Any]) -> bool:
    """A method that attacked at least one update (the others are in "What was audited")."""
    return any(method["status"].get(status) for status in ("done", "reused", "failed", "error"))


def _recovered_counts(record: dict[str, Any]) -> list[int] | None:
    entry = main_attack(record, "labels")
    return ((entry or {}).get("evidence") or {}).get("counts")


def _iacc(record: dict[str, Any]) -> float:
    value = ((main_attack(record, "labels") or {}).get("scores") or {}).get("iAcc")
    return value if value is not None else -1.0


def _images(summary: dict[str, Any], records: list[dict[str, Any]]) -> str:
    rows = [m for m in summary["methods"] if m["step"] == "reconstruct" and _ran(m)]
    if not rows:
        return ""
    flat = [{"method": m["method"], "scored": m["scored"], **{k: m["means"].get(k) for k in ("psnr", "ssim", "lpips")},
             "consistent": m["consistent"]} for m in rows]
    parts = ["<h2 id=\"images\">Image leakage</h2>",
             table([("method", "method", f_text), ("scored", "scored", f_num), ("psnr", "PSNR dB", f_db),
                    ("ssim", "SSIM", f_num), ("lpips", "LPIPS", f_num), ("consistent", "self-checked", f_pct)], flat,
                   caption="per method" + ("" if summary["audit"]["lpips"] else
                                           "; LPIPS needs local network weights (--lpips-weights)"))]
    cards = [card for card in (_card(r, entry) for r, entry in _gallery_choice(records)) if card]
    if cards:
        parts.append(f"<h3>Gallery: truth next to reconstruction</h3><p class=\"muted\">Up to {GALLERY} updates, the "
                     "clearest reconstructions first; above each strip the real training images, below what the "
                     "server rebuilt from the update alone.</p>"
                     f"<div class=\"gallery\" id=\"gallery\">{''.join(cards)}</div>")
    return "".join(parts)


def _gallery_choice(records: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    scored, unscored = [], []
    for record in records:
        for entry in record.get("attacks", []):
            if entry["step"] != "reconstruct" or entry["status"] not in ("done", "reused") or not entry.get("output"):
                continue
            psnr = (entry.get("scores") or {}).get("psnr")
            (scored if psnr is not None else unscored).append((record, entry))
    scored.sort(key=lambda pair: (-(pair[1]["scores"]["psnr"]), pair[0]["name"], pair[1]["method"]))
    unscored.sort(key=lambda pair: (not (pair[1].get("evidence") or {}).get("consistent"), pair[0]["name"]))
    return (scored + unscored)[:GALLERY]


def _card(record: dict[str, Any], entry: dict[str, Any]) -> str | None:
    from gitool.errors import GitoolError
    from gitool.files import load_result, load_truth
    from gitool.plotting import image_grid_png

    try:
        images = load_result(entry["output"], ("reconstruction",)).require("images")[:8]
        truth = load_truth(record["truth"]) if record.get("truth") and entry.get("scores") else None
    except (GitoolError, OSError):
        return None  # moved or replaced since: the card is left out, the tables still hold the numbers
    labels = main_attack(record, "labels")
    recovered = ((labels or {}).get("evidence") or {}).get("classes") or []
    scores = entry.get("scores") or {}
    strips = []
    lines = [f"<b>{esc(record['name'])}</b> (client {esc(record.get('client'))}"
             + (f", round {esc(record['round'])}" if record.get("round") is not None else "") + ")",
             f"method <b>{esc(entry['method'])}</b>"]
    if truth is not None:
        matching = scores.get("matching", list(range(images.shape[0])))[: images.shape[0]]
        true_classes = record.get("true_classes") or []
        strips.append('<div class="strip-label">truth</div>' + img(image_grid_png(truth.images[matching]),
                                                                   f"truth of {record['name']}"))
        classes = [f"{true_classes[t] if t < len(true_classes) else '?'}"
                   f" → {recovered[i] if i < len(recovered) else '?'}" for i, t in enumerate(matching)]
        lines.append(f"class (true → recovered): {esc(', '.join(classes))}")
        lines.append(f"PSNR {scores['psnr']:.1f} dB, SSIM {scores.get('ssim', 0):.3f}"
                     + (f", LPIPS {scores['lpips']:.3f}" if scores.get("lpips") is not None else ""))
    else:
        consistent = (entry.get("evidence") or {}).get("consistent")
        lines.append("no truth file; recovered class: " + esc(", ".join(map(str, recovered)) or "-"))
        lines.append("the attack's own check: " + {True: "the images reproduce the update",
                                                   False: "flagged: the images do not reproduce the update",
                                                   None: "none"}[consistent])
    strips.append('<div class="strip-label">reconstruction</div>' + img(image_grid_png(images),
                                                                        f"reconstruction of {record['name']}"))
    return f'<figure class="card">{"".join(strips)}<figcaption>{"<br>".join(lines)}</figcaption></figure>'


def _rounds(summary: dict[str, Any]) -> str:
    rows = summary["per_round"]
    if not rows:
        return ""
    parts = ["<h2 id=\"rounds\">Leakage over rounds</h2>"]
    if len(rows) > 1:
        series = {"labels recovered": [r["label_accuracy"] for r in rows], "iAcc (counts)": [r["iAcc"] for r in rows],
                  "images recognisable": [r["images_recognisable"] for r in rows],
                  "labels self-checked": [r["labels_consistent"] for r in rows]}
        series = {k: v for k, v in series.items() if any(x is not None for x in v)}
        parts.append(img(line_chart([r["group"] for r in rows], series, "round", "% of updates / samples",
                                    "leakage per training round", percent=True), "leakage per round", "chart"))
    parts.append(table([("group", "round", f_text)] + LEAKAGE_COLUMNS, rows))
    return "".join(parts)


def _clients(summary: dict[str, Any]) -> str:
    rows = summary["per_client"]
    if not rows:
        return ""
    shown = sorted(rows, key=lambda r: (-(r["psnr"] or -1), -(r["label_accuracy"] or -1), -(r["iAcc"] or -1),
                                        str(r["group"])))[:TABLE_ROWS]
    note = f"{len(shown)} of {len(rows)} clients, the most leaking first (all in summary.json)" \
        if len(shown) < len(rows) else "the most leaking first"
    return ("<h2 id=\"clients\">Leakage per client</h2>"
            + table([("group", "client", f_text)] + LEAKAGE_COLUMNS, shown, caption=note))


def _defence(summary: dict[str, Any]) -> str:
    rows = summary["per_defence"]
    series = summary["defence_series"]
    if len(rows) < 2 and not series:
        only = rows[0]["group"] if rows else "unknown"
        return (f"<h2 id=\"defence\">Leakage against defence strength</h2><p>All updates were made with the same "
                f"defence setting ({esc(only)}), so no comparison can be drawn.</p>")
    parts = ["<h2 id=\"defence\">Leakage against defence strength</h2>",
             table([("group", "defence", f_text)] + LEAKAGE_COLUMNS, rows)]
    for knob, points in series.items():
        metric = comparable_metric(points)
        if metric is None:
            continue
        key, unit, label = metric
        percent = unit == "%"
        chart = line_chart([p["value_text"] for p in points], {label: [p[key] for p in points]}, KNOB_WORDS[knob],
                           "%" if percent else "dB", f"leakage against the {KNOB_WORDS[knob]}", percent=percent)
        parts.append(img(chart, f"leakage against {KNOB_WORDS[knob]}", "chart"))
    return "".join(parts)


def _updates(summary: dict[str, Any]) -> str:
    rows = summary["updates"][:TABLE_ROWS]
    note = (f"the first {len(rows)} of {len(summary['updates'])} updates; all of them, attack by attack, are in "
            "audit.csv") if len(rows) < len(summary["updates"]) else "attack by attack in audit.csv"
    columns: list[Column] = [("name", "update", f_text), ("client", "client", f_text), ("round", "round", f_text),
                             ("model", "model", f_text), ("shape", "sent", f_text), ("defence", "defence", f_text),
                             ("label_method", "labels by", f_text), ("label_accuracy", "label right", f_pct),
                             ("soft_label_error", "soft-label error", f_num), ("iAcc", "iAcc", f_pct),
                             ("image_method", "images by", f_text), ("psnr", "PSNR dB", f_db), ("ssim", "SSIM", f_num),
                             ("labels_consistent", "labels self-check", f_flag),
                             ("image_consistent", "images self-check", f_flag)]
    return "<h2 id=\"updates\">Every update</h2>" + table(columns, rows, caption=note)


def _problems(summary: dict[str, Any]) -> str:
    rows = summary["not_attacked"]
    if not rows:
        return ""
    return ("<h2 id=\"problems\">What was not attacked, and why</h2>"
            + table([("step", "step", f_text), ("method", "method", f_text), ("status", "status", f_text),
                     ("reason", "reason", f_text), ("updates", "updates", f_num)], rows[:100]))


def _glossary(summary: dict[str, Any]) -> str:
    return f"""<h2 id="glossary">How to read the numbers</h2><dl class="glossary">
<dt>labels recovered, soft-label error</dt><dd>For an update of one training sample, whether the server found the
class the client trained on, and the largest difference between the recovered and the true label vector (0 is
exact; below {LABEL_EXACT:g} counts as exact here). Label smoothing and mixup make labels soft; they are still
recovered.</dd>
<dt>cAcc, iAcc</dt><dd>For updates of batches or several local steps the server counts how many samples of each class
the client used. cAcc: share of classes whose presence or absence was found; iAcc: share of the client's samples
whose labels were counted right.</dd>
<dt>PSNR, SSIM, LPIPS</dt><dd>How close a reconstructed image is to the real one. PSNR in decibels: above
{IMAGE_RECOGNISABLE:g} dB the content is recognisable, above {IMAGE_EXACT:g} dB there is no visible difference (an exact
analytic reconstruction reaches about 300 dB). SSIM: 1 is identical, near 0 unrelated. LPIPS: perceptual distance,
0 is identical (only with local network weights).</dd>
<dt>self-checked</dt><dd>Without the client's real data an attack can still check itself: the recovered label, feature
or image must reproduce the update the client sent, to round-off. A passed check is strong evidence of leakage, a
failed one (flagged) means the result should not be trusted.</dd>
<dt>defence</dt><dd>What the client did to protect its update: DP-SGD (per-sample clipping norm and noise
multiplier) or pruning (the share of the smallest update entries set to zero), as the update records it.</dd>
</dl><p class="muted">Produced by gitool {esc(summary['gitool'])}. The attacks see only the updates; truth files are
read after every attack has finished, only to score them.</p>"""
