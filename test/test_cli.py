"""The int4tensor command line: quantize / convert / verify / inspect, flags and exit codes."""

import json
import os
import subprocess
import sys

import pytest

from int4tensor.cli import build_parser, main
from test.test_checkpoint import src  # noqa: F401  (the tiny checkpoint fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_quantize_verify_inspect(src, tmp_path, capsys):  # noqa: F811
    dst = tmp_path / "dst"
    code, out, _ = run(capsys, "quantize", src, dst, "--group-size", "32", "--no-progress")
    assert code == 0
    assert "quantized 3 tensors, kept 7 in high precision" in out
    assert "kept lm_head.weight: matches ignore pattern 'lm_head'" in out
    code, out, _ = run(capsys, "verify", src, dst)
    assert code == 0
    assert out.splitlines()[0].split() == ["tensor", "shape", "SQNR", "dB", "max", "abs", "err",
                                           "status"]
    assert "3 quantized tensors" in out and "0 failed" in out
    code, out, _ = run(capsys, "inspect", dst)
    assert code == 0 and "Int4Tensor" in out and "0 problem(s)" in out


def test_verify_fails_below_threshold(src, tmp_path, capsys):  # noqa: F811
    dst = tmp_path / "dst"
    assert run(capsys, "quantize", src, dst, "--group-size", "32", "--no-progress")[0] == 0
    code, out, _ = run(capsys, "verify", src, dst, "--threshold", "40")
    assert code == 1 and "FAIL" in out and "3 failed" in out


def test_compressed_tensors_symmetric_flag(src, tmp_path, capsys):  # noqa: F811
    dst = tmp_path / "ct"
    code, _, _ = run(capsys, "quantize", src, dst, "--group-size", "64", "--format",
                     "compressed-tensors", "--symmetric", "--no-progress", "--ignore")
    assert code == 0
    qcfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qcfg["config_groups"]["group_0"]["weights"]["symmetric"] is True
    assert "lm_head" not in qcfg["ignore"]  # --ignore with no pattern quantizes lm_head too
    code, out, _ = run(capsys, "convert", dst, tmp_path / "native", "--no-progress")
    assert code == 0 and "imported 3 quantized tensors" in out


def test_boolean_flags():
    parser = build_parser()
    args = parser.parse_args(["quantize", "a", "b", "--no-symmetric"])
    assert args.symmetric is False
    assert parser.parse_args(["quantize", "a", "b", "--symmetric"]).symmetric is True
    assert parser.parse_args(["quantize", "a", "b"]).ignore == ["lm_head"]
    with pytest.raises(SystemExit):  # "--symmetric False" is not silently True
        parser.parse_args(["quantize", "a", "b", "--symmetric", "False"])


def test_bad_input_is_a_clear_error(src, tmp_path, capsys):  # noqa: F811
    os.remove(src / "model-00001-of-00002.safetensors")
    code, out, err = run(capsys, "quantize", src, tmp_path / "dst", "--no-progress")
    assert code == 2
    assert err.startswith("error: ") and "model-00001-of-00002.safetensors" in err
    assert "Traceback" not in err and not (tmp_path / "dst").exists()
    code, _, err = run(capsys, "inspect", tmp_path / "nothing")
    assert code == 2 and "no such checkpoint file or directory" in err


def test_python_dash_m(src, tmp_path):  # noqa: F811
    out = subprocess.run([sys.executable, "-m", "int4tensor", "inspect", str(src)], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "quant_method dense, 2 file(s), 10 tensors (0 quantized)" in out.stdout


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


class TestErrorsAreOneLine:
    """Every bad input found so far: one ``error: ...`` line naming the problem, exit 2."""

    def test_config_problems(self, src, tmp_path, capsys):  # noqa: F811
        (src / "config.json").write_text("[1]")
        code, _, err = run(capsys, "quantize", src, tmp_path / "a", "--no-progress")
        assert_one_line_error(code, err, "config.json must hold a JSON object, not a list")
        (src / "config.json").write_text('{"quantization_config": "x"}')
        code, _, err = run(capsys, "quantize", src, tmp_path / "a", "--no-progress")
        assert_one_line_error(code, err, "quantization_config must be a JSON object")
        os.remove(src / "config.json")
        code, _, err = run(capsys, "quantize", src, tmp_path / "a", "--no-progress")
        assert_one_line_error(code, err, "has no config.json")
        (src / "config.json").mkdir()
        code, _, err = run(capsys, "quantize", src, tmp_path / "a", "--no-progress")
        assert_one_line_error(code, err, "config.json is not a file")
        assert not (tmp_path / "a").exists()

    def test_flag_problems(self, src, tmp_path, capsys):  # noqa: F811
        code, _, err = run(capsys, "quantize", src, tmp_path / "a", "--ignore", "[unclosed",
                           "--no-progress")
        assert_one_line_error(code, err, "ignore pattern '[unclosed' is not a valid regular")
        code, _, err = run(capsys, "quantize", src, tmp_path / "a", "--device", "foo",
                           "--no-progress")
        assert_one_line_error(code, err, "unknown device 'foo'")
        (tmp_path / "file").write_text("x")
        code, _, err = run(capsys, "quantize", src, tmp_path / "file" / "dst", "--no-progress")
        assert_one_line_error(code, err, "is a file, not a directory")
        code, _, err = run(capsys, "quantize", src, src, "--overwrite", "--no-progress")
        assert_one_line_error(code, err, "is SRC")

    def test_nan_weight_names_tensor_and_shard(self, src, tmp_path, capsys):  # noqa: F811
        from safetensors.torch import load_file, save_file

        path = src / "model-00002-of-00002.safetensors"
        shard = load_file(path)
        shard["model.layers.0.mlp.experts.gate_up_proj"][0, 0, 0] = float("inf")
        save_file(shard, path, metadata={"format": "pt"})
        code, _, err = run(capsys, "quantize", src, tmp_path / "a", "--group-size", "32",
                           "--no-progress")
        assert_one_line_error(code, err, "model-00002-of-00002.safetensors",
                              "'model.layers.0.mlp.experts.gate_up_proj'", "NaN/Inf")

    def test_ctrl_c(self, src, tmp_path, capsys, monkeypatch):  # noqa: F811
        import int4tensor.checkpoint as ckpt

        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(ckpt.Int4WeightOnlyConfig, "quantize_weight", interrupted)
        code, _, err = run(capsys, "quantize", src, tmp_path / "a", "--no-progress")
        assert code == 130 and err == "error: interrupted (DST was not written)\n"
        assert os.listdir(tmp_path) == ["src"]  # no DST, no temporary left

    def test_verify_against_unquantized_dst_says_why(self, src, tmp_path, capsys):  # noqa: F811
        import shutil

        shutil.copytree(src, tmp_path / "copy")
        code, out, _ = run(capsys, "verify", src, tmp_path / "copy")
        assert code == 1 and "holds no quantized tensor to verify" in out


class TestHelp:
    def test_help_shows_defaults_and_every_flag_has_text(self, capsys):
        with pytest.raises(SystemExit):
            main(["quantize", "--help"])
        out = capsys.readouterr().out
        assert "(default: 128)" in out and "(default: native)" in out
        assert "replace a non-empty DST" in out and "show progress bars" in out

    def test_version(self, capsys):
        import int4tensor

        with pytest.raises(SystemExit) as e:
            main(["--version"])
        assert e.value.code == 0
        assert capsys.readouterr().out.strip() == f"int4tensor {int4tensor.__version__}"

    def test_stale_temporary_is_reported(self, src, tmp_path, capsys):  # noqa: F811
        (tmp_path / ".a.abcd1234.tmp").mkdir()
        code, _, err = run(capsys, "quantize", src, tmp_path / "a", "--no-progress")
        assert code == 0
        assert f"removed {tmp_path / '.a.abcd1234.tmp'}, left by an interrupted earlier run" in err
