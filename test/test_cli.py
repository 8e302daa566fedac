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
