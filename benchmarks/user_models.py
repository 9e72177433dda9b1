"""Models as users write them (tests/user_models.py), imported and attacked through the CLI.

For each model a plain PyTorch client takes one step on one random image (float64 by
default), saves ``before.pt`` and ``grad.pt`` (state dicts) and its private sample; then
``gitool import --model usernets:FACTORY``, ``labels`` (auto), ``features``,
``reconstruct --method fc|conv`` and ``truth`` + ``score`` run as a user would. The table
gives per model: whether the import worked, the label method and its max abs error, and
the reconstruction's PSNR and relative error, or the line the analytic method refused it
with. The RLU paper's LeNet5 also gets a FedAvg round (B = 8, m = 3) and ``labels
--method rlu``, scored by iAcc.

    python benchmarks/user_models.py                 # float64, the exactness claim
    python benchmarks/user_models.py --dtype float32 # what real clients send
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
K = 10

# factory, input shape, --model-output, client mode, analytic method, what it shows
ROWS = [
    ("functional_mlp", (3, 8, 8), None, "train", "fc", "F.relu, torch.sigmoid, torch.flatten"),
    ("shared_activation_cnn", (3, 8, 8), None, "train", "conv", "one LeakyReLU at two places, padding='same'"),
    ("sequential_mlp", (3, 8, 8), None, "train", "fc", "a bare nn.Sequential"),
    ("view_flatten_cnn", (3, 8, 8), None, "train", "conv", "torch.relu, x.view(x.size(0), -1)"),
    ("dropout_mlp", (3, 8, 8), None, "eval", "fc", "nn.Dropout and F.dropout, client in eval mode"),
    ("dict_output_mlp", (3, 8, 8), "logits", "train", "fc", "returns a dict; a head registered after the classifier"),
    ("rconv_lenet", (3, 32, 32), 0, "train", "conv", "R-CONV's LeNet: one activation at 3 places, (out, x)"),
    ("rlu_lenet5", (3, 32, 32), 0, "train", "conv", "RLU's LeNet5: max pooling, (logits, embedding)"),
    ("residual_mlp", (3, 8, 8), None, "train", "fc", "a skip connection"),
    ("twice_used_linear", (3, 8, 8), None, "train", "fc", "one Linear applied twice"),
]


def gitool(*args) -> tuple[int, str, str]:
    """``gitool ARGS`` in this process: (exit code, stdout, stderr)."""
    from gitool.cli import main

    saved, sys.argv = sys.argv, ["gitool", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue()


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    return lines[-1].removeprefix("error: ") if lines else stderr.strip()[-200:]


def one_model(usernets, name, shape, output, mode, method, dtype) -> dict:
    torch.manual_seed(0)
    net = getattr(usernets, name)(num_classes=K, input_shape=shape).to(dtype)
    net.train(mode == "train")
    before = {key: value.clone() for key, value in net.state_dict().items()}
    images, labels = torch.rand(1, *shape, dtype=dtype), torch.tensor([3])
    out = net(images)
    F.cross_entropy(out if output is None else out[output], labels).backward()
    torch.save(before, "before.pt")
    torch.save({n: p.grad for n, p in net.named_parameters()}, "grad.pt")
    torch.save({"images": images, "labels": labels}, "private.pt")
    trust = ["--model", f"usernets:{name}"]
    row = {"model": name}
    code, _, err = gitool("import", *trust, "-K", K, "--image-size", "x".join(map(str, shape)), "--before",
                          "before.pt", "--grad", "grad.pt", "-B", 1, "--hard-labels", "--normalize", "none",
                          "--no-defence", "--mode", mode, "-o", "u.update.safetensors",
                          *(["--model-output", output] if output is not None else []))
    row["import"] = "yes" if code == 0 else error_line(err)
    if code:
        return row
    gitool("truth", "u.update.safetensors", *trust, "--private", "private.pt", "-o", "u.truth.safetensors")
    code, out, err = gitool("labels", "u.update.safetensors", *trust, "-o", "u.labels.safetensors", "--json")
    if code:
        row["labels"] = error_line(err)
        return row
    label_method = json.loads(out)["files"][0]["method"]
    _, out, _ = gitool("score", "u.labels.safetensors", "--truth", "u.truth.safetensors", "--json")
    row["labels"] = f"{label_method}, max abs error {json.loads(out)['files'][0]['max_abs_error']:.1e}"
    gitool("features", "u.update.safetensors", *trust, "--labels", "u.labels.safetensors",
           "-o", "u.features.safetensors")
    started = time.perf_counter()
    code, _, err = gitool("reconstruct", "u.update.safetensors", *trust, "--labels", "u.labels.safetensors",
                          "--features", "u.features.safetensors", "--method", method, "-o",
                          "u.reconstruction.safetensors")
    if code:
        row["reconstruction"] = f"{method}: refused: {error_line(err)}"
        return row
    seconds = time.perf_counter() - started
    _, out, _ = gitool("score", "u.reconstruction.safetensors", "--truth", "u.truth.safetensors", "--json")
    from gitool.files import load_result

    recovered = load_result("u.reconstruction.safetensors").require("images")
    relative = float((recovered - images.to(recovered.dtype)).norm() / images.norm())
    row["reconstruction"] = (f"{method}: PSNR {json.loads(out)['files'][0]['psnr']:.1f} dB, relative error "
                             f"{relative:.1e} ({seconds:.2f} s)")
    return row


def rlu_round(usernets, dtype) -> dict:
    """The RLU LeNet5 as a FedAvg client: 3 local steps of 8 random images."""
    torch.manual_seed(5)
    net = usernets.rlu_lenet5(num_classes=K, input_shape=(3, 32, 32)).to(dtype)
    before = {key: value.clone() for key, value in net.state_dict().items()}
    images, labels = torch.rand(24, 3, 32, 32, dtype=dtype), torch.randint(0, K, (24,))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    for step in range(3):
        batch = slice(8 * step, 8 * step + 8)
        optimizer.zero_grad()
        F.cross_entropy(net(images[batch])[0], labels[batch]).backward()
        optimizer.step()
    torch.save(before, "before.pt")
    torch.save(net.state_dict(), "after.pt")
    torch.save({"images": images, "labels": labels}, "private.pt")
    trust = ["--model", "usernets:rlu_lenet5"]
    gitool("import", *trust, "--model-output", 0, "-K", K, "--image-size", "3x32x32", "--before", "before.pt",
           "--after", "after.pt", "-B", 8, "--steps", 3, "--lr", 0.01, "--optimizer", "sgd", "--weight-decay", 0,
           "--mode", "train", "--hard-labels", "--normalize", "none", "--no-defence", "-o", "r.update.safetensors")
    gitool("labels", "r.update.safetensors", *trust, "--method", "rlu", "--aux", "synthetic",
           "-o", "r.labels.safetensors")
    _, out, _ = gitool("truth", "r.update.safetensors", *trust, "--private", "private.pt", "-o",
                       "r.truth.safetensors", "--json")
    replay = json.loads(out)["replay_error"]
    _, out, _ = gitool("score", "r.labels.safetensors", "--truth", "r.truth.safetensors", "--json")
    scored = json.loads(out)["files"][0]
    return {"model": "rlu_lenet5 (FedAvg B=8, m=3)", "import": "yes",
            "labels": f"rlu: cAcc {scored['cAcc']:.3f}, iAcc {scored['iAcc']:.3f} (replay error {replay:.1e})",
            "reconstruction": "-"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        Path("usernets.py").write_text((ROOT / "tests" / "user_models.py").read_text())
        sys.path.insert(0, folder)
        import usernets

        for name, shape, output, mode, method, what in ROWS:
            row = one_model(usernets, name, shape, output, mode, method, dtype)
            row["what"] = what
            rows.append(row)
            print(f"  {name}: done", file=sys.stderr, flush=True)
        rows.append({**rlu_round(usernets, dtype), "what": "labels of a multi-step update"})
    load = os.getloadavg()
    print(f"user models, {args.dtype}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print(f"| model | written as | import | labels (method, error) | reconstruction ({args.dtype}) or refusal |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['model']} | {row['what']} | {row['import']} | {row.get('labels', '-')} | "
              f"{row.get('reconstruction', '-')} |")


if __name__ == "__main__":
    main()
