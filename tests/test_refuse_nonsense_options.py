"""Options that make no sense: refused by the parser in one line (no usage block), or, where the model's
shapes decide, after loading and before calibration."""

from __future__ import annotations

import pytest
from hostile import refused

import numprune.cli.generate
from numprune.modeling.llamagen import LlamaGenConfig, LlamaGenForCausalLM

PRUNE = ["prune", "--ratio", "0.3", "--nsamples", "2", "--seqlen", "16", "--quiet"]

# Refused by argparse: nothing is loaded.
PARSER_CASES = {
    "--iterations 0": (PRUNE + ["--iterations", "0"], "--iterations: must be a positive integer"),
    "--iterations -3": (PRUNE + ["--iterations", "-3"], "--iterations: must be a positive integer"),
    "--damp nan": (PRUNE + ["--damp", "nan"], "--damp: expected a finite number"),
    "--score-damp -1": (PRUNE + ["--score-damp", "-1"], "--score-damp: must be a finite number >= 0"),
    "--lambda-rel -1": (PRUNE + ["--lambda-rel", "-1"], "--lambda-rel: must be a finite number >= 0"),
    "--seed -1": (PRUNE + ["--seed", "-1"], "--seed: must be an integer between 0 and"),
    "--seed 2**70": (PRUNE + ["--seed", str(2**70)], "--seed: must be an integer between 0 and"),
    "--device cpufoo": (PRUNE + ["--device", "cpufoo"], "--device: must be cpu, cuda or cuda:N"),
    "--ratio abc": (["prune", "--ratio", "abc"], "--ratio: expected a number"),
    "--round-to 2.5": (PRUNE + ["--round-to", "2.5"], "--round-to: expected an integer"),
    "--eval-windows 0": (PRUNE + ["--eval", "sotu", "--eval-windows", "0"], "--eval-windows: must be a positive"),
    "ppl --data ''": (["ppl", "--data", ""], "--data: expected a comma-separated list without empty items"),
    "compare --methods ,,": (["compare", "--methods", ",,"], "--methods: expected a comma-separated list"),
    "compare --ratios 0.2,,0.3": (["compare", "--ratios", "0.2,,0.3"], "--ratios: expected a comma-separated list"),
    "generate --temperature nan": (["generate", "--model", "digits", "--temperature", "nan"],
                                   "--temperature: expected a finite number"),
    "generate --cfg-scale inf": (["generate", "--model", "digits", "--cfg-scale", "inf"],
                                 "--cfg-scale: expected a finite number"),
    "bench --batch 1,,8": (["bench", "--batch", "1,,8"], "--batch: expected a comma-separated list"),
    "bench --quant q8_0,q8_0": (["bench", "--backend", "llama.cpp", "--quant", "q8_0,q8_0"],
                                "--quant: q8_0 is given twice in 'q8_0,q8_0'"),
    "compare --methods numerical,numerical": (["compare", "--methods", "numerical,numerical"],
                                              "--methods: numerical is given twice"),
    "compare --ratios 0.3,0.30": (["compare", "--ratios", "0.3,0.30"], "--ratios: 0.3 is given twice in '0.3,0.30'"),
    "--blend-weight 0_5": (PRUNE + ["--blend-weight", "0_5"], "--blend-weight: expected a number, got '0_5'"),
    "--gqa-unit sideways": (PRUNE + ["--gqa-unit", "sideways"], "--gqa-unit: invalid choice: 'sideways'"),
    "--allocation nope": (PRUNE + ["--allocation", "nope"], "--allocation: invalid choice: 'nope'"),
    "--compensation ridge": (PRUNE + ["--compensation", "ridge"], "--compensation: invalid choice: 'ridge'"),
}

# Flags that mean nothing without another, or contradict one: refused before anything is loaded.
MEANINGLESS_CASES = {
    "prune --outtype q8_0 without --gguf": (PRUNE + ["--outtype", "q8_0"], "--outtype is the tensor type of the --gguf"),
    "prune --compensation affine --no-compensate": (PRUNE + ["--compensation", "affine", "--no-compensate"],
                                                    "--no-compensate contradicts --compensation affine"),
    "prune --allocation-compensation affine (blend allocation)": (
        PRUNE + ["--allocation-compensation", "affine"],
        "an allocation compensation guides the compensated-error allocation only, not blend"),
    "bench --quant q8_0 (transformers backend)": (["bench", "--quant", "q8_0"], "--quant is for the llama.cpp backend"),
    "compare: damp twice in one entry": (["compare", "--methods", "numerical:damp=0.1:damp=0.2"],
                                         "'numerical:damp=0.1:damp=0.2' sets damp twice"),
    "compare: compensation_damp=0_1": (["compare", "--methods", "numerical:compensation_damp=0_1"],
                                       "bad value '0_1' for compensation_damp"),
    "prune --calib sotu:1_0+emails": (PRUNE + ["--calib", "sotu:1_0+emails"], "bad weight '1_0' for 'sotu'"),
    "prune --gguf ''": (PRUNE + ["--gguf", ""], "--gguf is empty; name the GGUF file to write"),
    "export --gguf ''": (["export", "--model", "smollm2", "--gguf", ""], "the output path is empty"),
}


@pytest.mark.parametrize("case", [*PARSER_CASES, *MEANINGLESS_CASES])
def test_nonsense_flags_are_refused_in_one_line_before_loading(case, tmp_path):
    args, message = {**PARSER_CASES, **MEANINGLESS_CASES}[case]
    refused(case, message, *args, *(["--out", tmp_path / "out"] if args[0] in ("prune", "compare") else []),
            *(["--grid", tmp_path / "g.png"] if args[0] == "generate" else []), inputs=[tmp_path])
    assert list(tmp_path.iterdir()) == []


# Decided by the model's shapes: refused after loading, before calibration (tests/test_api_errors.py
# proves "before calibration" with a calibration pass that fails if it starts).
SHAPE_CASES = {
    "--ratio 0.99 (would empty a layer)": (["--ratio", "0.99"], "would leave"),
    "--ratio 0.99 --allocation uniform": (["--ratio", "0.99", "--allocation", "uniform"], "would leave layer"),
    "--round-to 100000": (["--round-to", "100000"], "against a target of 30.0%"),
    "--nsamples 1000000 --seqlen 512": (["--nsamples", "1000000", "--seqlen", "512"], "tokens; at most"),
    "--damp 0 on 32 tokens": (["--damp", "0", "--compensation", "least-squares"],
                              "least-squares compensation at damping 0 needs at least 36 calibration tokens for layer "
                              "0's self_attn.o_proj (36 inputs"),
    "--damp 0 --compensation affine on 32 tokens": (["--damp", "0", "--compensation", "affine"],
                                                    "affine compensation at damping 0 needs at least 37"),
}


@pytest.mark.parametrize("case", list(SHAPE_CASES))
def test_what_the_shapes_decide_is_refused_before_calibration(case, tiny_model_folder, tmp_path):
    args, message = SHAPE_CASES[case]
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    refused(f"prune {case}", message, *PRUNE, *args, "--model", tiny_model_folder, "--calib", text,
            "--out", tmp_path / "out", inputs=[tiny_model_folder, text])
    assert [p.name for p in tmp_path.iterdir()] == ["calib.txt"]


def test_info_on_an_unknown_command_or_option_is_one_line(tmp_path):
    refused("numprune frobnicate", "invalid choice", "frobnicate", inputs=[tmp_path])
    refused("prune --no-such-option", "unrecognized arguments", *PRUNE, "--out", tmp_path / "o", "--no-such-option",
            inputs=[tmp_path])


@pytest.mark.parametrize("hook,message", [("builtins:len", "it returned int"),
                                          ("builtins:abs", "it returned a tensor torch.int64 [1, 16]"),
                                          ("json:dumps", "failed on token ids [1, 16]: TypeError")])
def test_a_decoder_hook_that_returns_no_images_is_refused_before_sampling(hook, message, tmp_path, monkeypatch):
    folder = tmp_path / "image-model"
    LlamaGenForCausalLM(LlamaGenConfig(vocab_size=17, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=16, num_classes=3, image_tokens=16)).save_pretrained(folder)

    def sampling_started(*_, **__):
        raise AssertionError("sampling started")

    monkeypatch.setattr(numprune.cli.generate, "generate", sampling_started)
    refused(f"generate --decoder {hook}", message, "generate", "--model", folder, "--decoder", hook, "--classes", "0-2",
            "--grid", tmp_path / "g.png", inputs=[folder])
    assert not (tmp_path / "g.png").exists()


def test_a_path_with_a_newline_is_named_on_one_line(tmp_path):
    """A control character in a path the message quotes is escaped, not printed: the refusal stays one line."""
    missing = tmp_path / "no\nsuch\rmodel"
    refused("prune --model 'no<newline>such<CR>model'", "no\\nsuch\\rmodel", *PRUNE, "--model", missing,
            "--out", tmp_path / "out", inputs=[tmp_path])
