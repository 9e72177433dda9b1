"""Which attacks apply to an update, from its facts alone (gitool/audit/planner.py)."""

import pytest

from gitool.audit.planner import Selection, analytic_method, parse_methods, plan
from gitool.errors import UsageError
from gitool.files import load_update


def test_methods_parse_into_steps():
    assert parse_methods("auto") == Selection(("auto",), True, ("analytic",))
    assert parse_methods("all") == Selection(("auto",), True, ("analytic", "optimize"))
    assert parse_methods("labels") == Selection(("auto",), False, ())
    # named methods keep their order; features and reconstructions read labels, so they come too
    assert parse_methods("lambda,rlu,features") == Selection(("lambda", "rlu"), True, ())
    assert parse_methods("conv") == Selection(("auto",), False, ("conv",))
    with pytest.raises(UsageError, match="unknown step or method 'psnr'.*choose from auto, all"):
        parse_methods("labels,psnr")
    with pytest.raises(UsageError, match="empty"):
        parse_methods(" , ")


def planned(path, methods="auto", **options):
    return [(a.step, a.method, a.main, a.skip) for a in plan(load_update(path, tensors="classifier"),
                                                            parse_methods(methods), options)]


def test_a_single_sample_update_gets_label_feature_and_the_analytic_method_its_model_allows(federated_run):
    cnn = federated_run / "round-1" / "0000.update.safetensors"
    assert planned(cnn) == [("labels", "bias", True, None), ("features", "features", True, None),
                            ("reconstruct", "conv", True, None)]
    fcn = federated_run / "round-2" / "client-1.update.safetensors"  # no classifier bias: the lambda search
    assert planned(fcn) == [("labels", "lambda", True, None), ("features", "features", True, None),
                            ("reconstruct", "fc", True, None)]
    assert planned(fcn, "fc,conv")[1:] == [("reconstruct", "fc", True, None), ("reconstruct", "conv", False, None)]
    assert planned(cnn, "fc")[1][3] == "the model has convolutions: fc does not apply (conv does)"


def test_batches_and_multi_step_updates_get_label_counts(federated_run):
    multistep = federated_run / "round-2" / "client-2.update.safetensors"
    steps = planned(multistep)
    assert steps[0] == ("labels", "llg", True, None)  # no --aux: counts without auxiliary data
    assert steps[1][3].startswith("the last-layer input needs a gradient")
    assert steps[2][1] == "analytic" and "needs one local step; this update has 3" in steps[2][3]
    assert planned(multistep, "labels", aux="synthetic")[0] == ("labels", "rlu", True, None)
    batch = federated_run / "round-2" / "client-3.update.safetensors"
    assert planned(batch, "labels")[0] == ("labels", "ilrg", True, None)  # one step with a bias
    # a method named for the wrong shape is not applicable, and the next one becomes the main result
    assert planned(batch, "lambda,llg") == [
        ("labels", "lambda", False, "lambda attacks a single-sample gradient; this is a gradient of one step on a "
                                    "batch of 4"),
        ("labels", "llg", True, None)]


def test_a_model_the_analytic_inversion_cannot_walk_is_named_once():
    from gitool.models import ModelSpec

    spec = ModelSpec(name="resnet18", num_classes=10, input_shape=(3, 16, 16))
    import json

    method, reason = analytic_method(json.dumps(spec.to_dict(), sort_keys=True), (3, 16, 16))
    assert method is None and "analytic reconstruction does not apply" in reason and "BatchNorm2d" in reason
