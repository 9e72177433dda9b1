"""summary.json, audit.csv and report.html from an audit's records (gitool/audit/report.py),
and the page as a browser shows it (headless Chromium, when installed: .ci/run installs it)."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess

import pytest

from gitool.audit import prepare, run


@pytest.fixture(scope="module")
def audited(federated_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    items, settings = prepare([federated_run], out, "auto", {"aux": "synthetic", "aux_per_class": 4})
    context = {"inputs": [str(federated_run)], "methods": "auto"}
    outcome = run(items, settings, context=context)
    outcome.settings, outcome.context = settings, context  # for a second report of the same records
    return out, outcome


def test_summary_numbers_per_client_round_and_defence(audited):
    out, outcome = audited
    summary = json.loads((out / "summary.json").read_text())
    assert summary["audit"]["updates"] == 5 and summary["audit"]["audited"] == 5
    overall = summary["overall"]
    assert overall["labels_scored"] == 3 and overall["label_accuracy"] == 1.0 and overall["soft_label_error"] < 1e-12
    assert overall["images_scored"] == 3 and overall["images_exact"] == 1.0 and overall["psnr"] > 200
    assert overall["counts_scored"] == 2 and 0 < overall["iAcc"] <= 1
    assert summary["findings"]["risk"] == "high"
    assert any("3 came out recognisable" in s for s in summary["findings"]["sentences"])
    rounds = {row["group"]: row for row in summary["per_round"]}
    assert rounds[1]["updates"] == 2 and rounds[1]["psnr"] > 200 and rounds[2]["updates"] == 3
    clients = {row["group"] for row in summary["per_client"]}
    assert clients == {"0000", "0001", "1", "2", "3"}
    defences = {row["group"]: row for row in summary["per_defence"]}
    assert set(defences) == {"none", "clip 1, noise 0.5"} and defences["clip 1, noise 0.5"]["updates"] == 1
    noise = summary["defence_series"]["dp_noise"]
    assert [row["value_text"] for row in noise] == ["none", "0.5"]
    assert [u["name"] for u in summary["updates"]] == [r["name"] for r in outcome.records]
    reasons = {(row["step"], row["status"]) for row in summary["not_attacked"]}
    assert ("features", "n/a") in reasons and ("reconstruct", "n/a") in reasons


def test_summary_json_follows_its_schema(audited):
    jsonschema = pytest.importorskip("jsonschema")
    from pathlib import Path

    out, _ = audited
    schema = json.loads((Path(__file__).resolve().parents[2] / "docs" / "schemas" /
                         "audit-summary.schema.json").read_text())
    document = json.loads((out / "summary.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(document)] == []
    document["findings"]["risk"] = "catastrophic"
    assert not jsonschema.Draft202012Validator(schema).is_valid(document)


def test_the_csv_has_one_row_per_update_and_attack(audited):
    out, outcome = audited
    rows = list(csv.DictReader(io.StringIO((out / "audit.csv").read_text())))
    assert len(rows) == sum(len(r["attacks"]) for r in outcome.records) == 16
    dp = [row for row in rows if row["name"] == "round-2/client-3" and row["method"] == "per-sample"][0]
    assert dp["status"] in ("refused", "failed")  # DP noise: no label set fits within the update's precision
    conv = [row for row in rows if row["name"] == "round-1/0000" and row["method"] == "conv"][0]
    assert conv["status"] == "done" and float(conv["psnr"]) > 200 and conv["consistent"] == "true"
    rlu = [row for row in rows if row["name"] == "round-2/client-2" and row["step"] == "labels"][0]
    assert rlu["method"] == "rlu" and rlu["dp_noise"] == "" and 0 < float(rlu["iAcc"]) <= 1


def test_the_page_is_self_contained_and_reproducible(audited):
    out, outcome = audited
    page = (out / "report.html").read_text()
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page, re.I)  # nothing fetched
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 8 and all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    for heading in ("Summary in plain words", "Label leakage", "Image leakage", "Leakage over rounds",
                    "Leakage per client", "Leakage against defence strength", "Every update"):
        assert heading in page
    from gitool.audit.report import write_report

    again = out.parent / "again"
    again.mkdir()
    write_report(outcome.records, again, total=5, interrupted=False, settings=outcome.settings,
                 context=outcome.context)
    assert (again / "report.html").read_bytes() == (out / "report.html").read_bytes()
    assert (again / "audit.csv").read_bytes() == (out / "audit.csv").read_bytes()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs headless Chromium (apt-get install chromium; .ci/run does)")
def test_chromium_shows_the_tables_and_images(audited, tmp_path):
    import numpy as np
    from PIL import Image

    out, _ = audited
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400"]
    url = (out / "report.html").as_uri()
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120, env=env).stdout
    assert dom.count("<table") >= 8 and dom.count("<img") >= 8 and 'id="gallery"' in dom
    assert "High risk: client updates reveal private training images." in dom
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, timeout=120, env=env)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2400, 1200)
    # the risk box's background (#fde8e8) and border (#c81e1e): the inline style sheet applied
    assert (np.abs(pixels - [0xfd, 0xe8, 0xe8]).sum(axis=2) < 6).sum() > 5000
    assert (np.abs(pixels - [0xc8, 0x1e, 0x1e]).sum(axis=2) < 6).sum() > 200
    # the embedded pictures drew: plenty of saturated pixels (charts' bars, the gallery's images)
    saturation = pixels.max(axis=2) - pixels.min(axis=2)
    assert (saturation > 80).sum() > 20000
    shutil.copy(shot, out / "report.png")  # kept beside the report for a look
