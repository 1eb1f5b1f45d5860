"""benchmarks/nano_speed.py times real nano models side by side and refuses bad variants."""

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def speed():
    return load_benchmark("nano_speed")


def test_times_the_shipped_model_a_variant_and_a_checkpoint(speed, tiny_weights, capsys):
    assert speed.main(["--variant", "num_layers=1,patch_size=8", "--weights", str(tiny_weights),
                       "--group", "2", "--repeats", "1", "--threads", "1"]) == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| model")]
    assert [r[0] for r in rows] == ["shipped", "num_layers=1,patch_size=8", str(tiny_weights)]
    assert rows[0][3] == rows[0][5] == "1.00" and all(float(r[2]) > 0 and float(r[4]) > 0 for r in rows)
    assert float(rows[1][1].rstrip("M")) < float(rows[0][1].rstrip("M"))  # one block instead of four


def test_bad_variant_or_folder_is_one_line(speed, tmp_path, capsys):
    assert speed.main(["--variant", "patch=8"]) == 2
    assert "is not FIELD=INTEGER" in capsys.readouterr().err
    assert speed.main(["--weights", str(tmp_path)]) == 2
    assert "not a nano checkpoint folder" in capsys.readouterr().err
