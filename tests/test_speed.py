"""The speed benchmark's side-by-side comparison: parsing the reference's output and the
table of ranges (the measurements themselves are benchmarks, not tests)."""

import pytest

from evaluate.measure.speed import _last_json, format_comparison, main


def _row(cores, ref, ours, ref_wall, ours_wall, ref_c, ours_c):
    return {
        "cores": cores,
        "ref_steps_per_cpu_s": ref,
        "ours_steps_per_cpu_s": ours,
        "ratio_cpu": ours / ref,
        "ref_steps_per_wall_s": ref_wall,
        "ours_steps_per_wall_s": ours_wall,
        "ratio_wall": ours_wall / ref_wall,
        "ref_compile_s": ref_c,
        "ours_compile_s": ours_c,
    }


def test_comparison_table_gives_ranges_and_same_round_ratios():
    rows = [
        _row(1, 3000, 6300, 3000, 6300, 5.5, 4.8),
        _row(1, 3300, 6600, 3300, 6600, 5.4, 4.7),
        _row(2, 2500, 5000, 3500, 9000, 5.2, 3.3),
    ]
    lines = format_comparison(rows).splitlines()
    assert len(lines) == 4
    one = lines[2].split(" | ")
    assert one[0] == "| 1" and one[1] == "2"
    assert one[2] == "3,000–3,300" and one[3] == "6,300–6,600"
    # Ratios are taken within a round (2.10 and 2.00), not between the ranges' ends.
    assert one[4] == "2.00–2.10×"
    two = lines[3].split(" | ")
    assert two[4] == "2.00×" and two[7] == "2.57×" and two[-1] == "3.3 s |"


def test_last_json_line_is_the_result():
    out = 'progress\n{"a": 1}\nnoise\n{"compile_s": 5.5}\n'
    assert _last_json(out) == {"compile_s": 5.5}
    with pytest.raises(ValueError):
        _last_json("no json here\n")


def test_compare_without_the_reference_says_how_to_build_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--compare", "--reference-python", str(tmp_path / "missing" / "python")])
    assert exit_.value.code == 2
    assert "setup.sh" in capsys.readouterr().err
