"""The device contract (numprune.precision): the model may live anywhere; the layer passes run on ``device``,
by default the model's own in every entry point; statistics and solves run in float64 without TF32 where the
statistics are; each weight gets its result on its own device in its own dtype."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import tiny_llama, tiny_tokens
from hostile import in_process

import numprune.pipeline
from numprune import NumpruneError, calibrate, prune, prune_streaming
from numprune import compensate as compensation
from numprune.adapters import adapter_for
from numprune.calibrate import InputStats
from numprune.cli import parser
from numprune.criteria import numerical
from numprune.precision import full_precision, model_device

TOKENS = tiny_tokens(8, 24)


def same_run(a, b, atol=0.0):
    """Two runs' pruned models: identical plans, and every tensor within ``atol`` (compared on the CPU)."""
    (model_a, report_a), (model_b, report_b) = a, b
    assert report_a["layers"] == report_b["layers"]
    state_b = model_b.state_dict()
    for name, tensor in model_a.state_dict().items():
        torch.testing.assert_close(state_b[name].cpu(), tensor.cpu(), atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("options", [dict(), dict(method="numerical", allocation="compensated-error",
                                                  compensation="affine", compensation_stats="sequential"),
                                     dict(method="flap"), dict(method="wanda-sp")])
def test_a_run_places_every_tensor_itself(options):
    """Under a default device with no data (meta), a run gives exactly the plain run: no statistic, score, solve
    or rebuilt layer lands wherever torch's default device happens to be (a GPU user's set_default_device)."""
    model = tiny_llama("gqa")
    plain = prune(model, TOKENS, ratio=0.3, progress=False, **options)
    with torch.device("meta"):
        elsewhere = prune(model, TOKENS, ratio=0.3, progress=False, **options)
    same_run(plain, elsewhere)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_gets_float64_fits_in_its_own_dtype(dtype):
    """The refit is solved in float64 from float64 statistics, then rounded once to the weights' dtype."""
    model = tiny_llama("gqa", layers=2).to(dtype)
    stats = calibrate(model, TOKENS, progress=False)
    pruned, report = prune(model, TOKENS, ratio=0.3, stats=stats, compensation="least-squares", heal=False,
                           progress=False)
    assert {p.dtype for p in pruned.parameters()} == {dtype}
    assert {p.device for p in pruned.parameters()} == {model_device(model)}
    adapter = adapter_for(model)
    for i, layer in enumerate(adapter.layers()):
        keep = adapter.kept_inputs(i, report.layers[i])[1]
        drop = torch.tensor([c for c in range(adapter.mlp_width(i)) if c not in keep.tolist()])
        g = stats[i].mlp.gram
        ridge = 0.01 * g.diagonal().mean() * torch.eye(len(keep), dtype=torch.float64)
        w = layer.mlp.down_proj.weight.detach().double()
        # normal equations of min ||X_K dW^T - X_P W_P^T||^2 + ridge ||dW||^2, solved directly
        expected = w[:, keep] + torch.linalg.solve(g[keep][:, keep] + ridge, g[keep][:, drop] @ w[:, drop].T).T
        got = adapter_for(pruned).layers()[i].mlp.down_proj.weight.detach()
        assert got.dtype == dtype
        # the float64 fit rounded once to the dtype: relative error below its machine epsilon
        torch.testing.assert_close(got.double(), expected, rtol=torch.finfo(dtype).eps, atol=1e-30)


def test_statistics_and_solves_run_without_tf32_and_the_callers_setting_comes_back(monkeypatch):
    seen = {}

    def recorded(name, function):
        def call(*args, **kwargs):
            seen.setdefault(name, set()).add((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(InputStats, "add", recorded("statistics", InputStats.add))
    monkeypatch.setattr(numerical, "newton_score", recorded("Newton score", numerical.newton_score))
    monkeypatch.setattr(compensation, "least_squares", recorded("least squares", compensation.least_squares))
    monkeypatch.setattr(compensation, "refit_errors", recorded("error curves", compensation.refit_errors))  # allocation
    caller = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        prune(tiny_llama("gqa"), TOKENS, ratio=0.3, method="numerical", allocation="compensated-error",
              progress=False)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # the caller's, back
        torch.set_float32_matmul_precision("medium")
        with pytest.raises(ZeroDivisionError), full_precision():
            raise ZeroDivisionError
        assert torch.get_float32_matmul_precision() == "medium"  # back after an error too, exactly
    finally:
        torch.set_float32_matmul_precision(caller[0])
        torch.backends.cudnn.allow_tf32 = caller[1]
    assert seen == dict.fromkeys(["statistics", "Newton score", "error curves", "least squares"],
                                 {(False, False)})


def test_every_entry_point_defaults_to_the_models_own_device(tiny_model_folder, tmp_path):
    for entry in (prune, calibrate, prune_streaming):
        assert inspect.signature(entry).parameters["device"].default is None, entry.__name__
    assert parser().parse_args(["prune", "--ratio", "0.3", "--out", "unused"]).device is None
    model = tiny_llama("gqa")
    _, report = prune(model, TOKENS, ratio=0.3, progress=False)
    streamed = prune_streaming(tiny_model_folder, TOKENS, ratio=0.3, out=tmp_path / "out", progress=False)
    assert report["compute"]["device"] == streamed["compute"]["device"] == str(model_device(model)) == "cpu"


# What the library and the command line both refuse, with the same words (one rule for a device).
DEVICES = {"cpu:1": "must be cpu, cuda or cuda:N", "meta": "must be cpu, cuda or cuda:N",
           "mps": "must be cpu, cuda or cuda:N", "cuda:x": "must be cpu, cuda or cuda:N",
           "cuda:99": "torch sees", " cpu": "must be cpu, cuda or cuda:N"}  # cuda:99: no such GPU, or none


@pytest.mark.parametrize("device", list(DEVICES))
def test_one_rule_for_a_device_in_the_library_and_on_the_command_line(device, monkeypatch, tmp_path):
    def calibration_started(*_, **__):
        raise AssertionError("calibration started")

    monkeypatch.setattr(numprune.pipeline.Compute, "stream", calibration_started)
    for entry in (lambda: prune(tiny_llama("gqa"), TOKENS, ratio=0.3, device=device, progress=False),
                  lambda: calibrate(tiny_llama("gqa"), TOKENS, device=device, progress=False)):
        with pytest.raises(NumpruneError, match=DEVICES[device]):
            entry()
    done = in_process("prune", "--ratio", "0.3", "--out", tmp_path / "out", "--device", device)
    assert done.returncode == 2 and done.stderr.startswith("numprune: error: argument --device: ")
    assert DEVICES[device] in done.stderr and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.cuda
@pytest.mark.parametrize("where", ["device='cuda'", "model.cuda()", "streamed"])
def test_the_same_run_on_the_gpu_equals_the_cpu_run(where, tiny_model_folder, tmp_path):
    """Masks identical and weights within 1e-4, with TF32 switched on by the caller."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_folder) if where == "streamed" else tiny_llama("gqa")
    tokens = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    cpu = prune(model, tokens, ratio=0.3, progress=False)
    tf32 = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        if where == "device='cuda'":
            gpu = prune(model, tokens, ratio=0.3, device="cuda", progress=False)
            assert {p.device.type for p in gpu[0].parameters()} == {"cpu"}  # the model stays where it is
        elif where == "model.cuda()":
            gpu = prune(copy.deepcopy(model).cuda(), tokens, ratio=0.3, progress=False)  # its own device: the GPU
            assert {p.device.type for p in gpu[0].parameters()} == {"cuda"}
        else:
            report = prune_streaming(tiny_model_folder, tokens, ratio=0.3, out=tmp_path / "out", device="cuda",
                                     progress=False)
            gpu = AutoModelForCausalLM.from_pretrained(tmp_path / "out"), report
        assert gpu[1]["compute"]["device"].startswith("cuda")
    finally:
        torch.set_float32_matmul_precision(tf32)
    same_run(cpu, gpu, atol=1e-4)
