"""benchmarks/nano_speed.py times real nano models side by side and refuses bad variants."""

import pytest

from conftest import load_benchmark


@pytest.fixture(scope="module")
def speed():
    return load_benchmark("nano_speed")


def test_times_the_shipped_model_a_variant_and_a_checkpoint(speed, tiny_weights, capsys):
    import torch

    threads = torch.get_num_threads()
    code = speed.main(["--variant", "num_layers=1,patch_size=8", "--weights", str(tiny_weights),
                       "--group", "2", "--repeats", "1", "--threads", "1"])
    torch.set_num_threads(threads)
    assert code == 0
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| model")]
    assert [r[0] for r in rows] == ["shipped", "num_layers=1,patch_size=8", str(tiny_weights)]
    for _, _, group, group_ratio, train, train_ratio in rows:  # each ratio is its time over the shipped one's
        assert float(group_ratio) == pytest.approx(float(group) / float(rows[0][2]), abs=0.01 + 0.01 * float(group_ratio))
        assert float(train_ratio) == pytest.approx(float(train) / float(rows[0][4]), abs=0.01 + 0.01 * float(train_ratio))
    assert float(rows[1][1].rstrip("M")) < float(rows[0][1].rstrip("M"))  # one block instead of four


def test_bad_variant_or_folder_is_one_line(speed, tmp_path, capsys):
    assert speed.main(["--variant", "patch=8"]) == 2
    assert "is not FIELD=N with N >= 1" in capsys.readouterr().err
    assert speed.main(["--variant", "patch_size=0"]) == 2
    assert "is not FIELD=N with N >= 1" in capsys.readouterr().err
    assert speed.main(["--variant", "patch_size=5"]) == 2
    assert "does not tile the 32x128 canvas" in capsys.readouterr().err
    assert speed.main(["--weights", str(tmp_path)]) == 2
    assert "not a nano checkpoint folder" in capsys.readouterr().err
